//! Who is calling: bearer tokens, checked by the broker.
//!
//! The gateway never holds the token store (it lives in the supervisor's state directory, out
//! of the sandbox's reach, so a compromised gateway cannot plant a token of its own). It hashes
//! the presented token and asks the broker (`auth`), which compares the hash in constant time
//! against every stored one and audits the decision. The token itself is never logged, stored
//! or sent anywhere; only its hash leaves this module.
//!
//! A token's check is reused for at most [`AUTH_REUSE`] ([`AuthCache`], keyed by the hash): a
//! keep-alive connection or a client making many calls a second costs at most one `auth` per
//! token per second, and a revoked token stops working within that second everywhere.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carapace_broker::ratelimit::Bucket;
use carapace_broker::sync::lock;
use carapace_broker::tokens::{Scope, TokenInfo};
use sha2::{Digest, Sha256};

use crate::rpc::{Kind, RpcError};

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub scope: Scope,
}

impl Caller {
    pub fn is_operator(&self) -> bool {
        self.scope == Scope::Operator
    }

    /// Refuse an operator-only method to a client token.
    pub fn require_operator(&self, method: &str) -> Result<(), RpcError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(RpcError::new(
                Kind::Forbidden,
                format!("{method} needs a token with the operator scope"),
            ))
        }
    }
}

impl From<TokenInfo> for Caller {
    fn from(t: TokenInfo) -> Caller {
        Caller {
            token_id: t.id,
            name: t.name,
            scope: t.scope,
        }
    }
}

/// Longest token text looked at (ours are 47 bytes).
const MAX_TOKEN_LEN: usize = 256;

/// The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), if well-formed.
pub fn bearer(header: Option<&[u8]>) -> Option<String> {
    let h = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, token) = h.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    well_formed(token.trim())
}

/// The `access_token` parameter of a query string, if well-formed.
pub fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
        .and_then(well_formed)
}

/// The subprotocol a browser offers (and the gateway selects) on `/ws`.
pub const WS_PROTOCOL: &str = "carapace.jsonrpc";
/// The prefix of the subprotocol that carries a token: `carapace.bearer.TOKEN`. Browsers cannot
/// set an `Authorization` header on a WebSocket, and a token in the URL lands in logs; the
/// offered subprotocols travel in the `Sec-WebSocket-Protocol` request header, and the gateway
/// answers with [`WS_PROTOCOL`] only, never echoing the token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "carapace.bearer.";

/// The token of a `carapace.bearer.TOKEN` subprotocol among the values of the
/// `Sec-WebSocket-Protocol` headers (comma-separated lists), if one is there and well-formed.
pub fn protocol_token<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    values
        .into_iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .and_then(well_formed)
}

fn well_formed(t: &str) -> Option<String> {
    (!t.is_empty() && t.len() <= MAX_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| t.to_string())
}

/// Lowercase hex SHA-256 of the token text: what the broker compares.
pub fn token_hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    hex::encode(d)
}

/// Failed authentications per peer address: over the limit, the gateway answers 429 without
/// asking the broker (so a guessing client can neither flood the audit log nor the broker).
/// 5 per second, bursts of 10; at most [`MAX_TRACKED`] addresses are remembered (full buckets
/// are forgotten first).
#[derive(Debug, Default)]
pub struct FailureLimit {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

const FAILURE_RATE: f64 = 5.0;
const FAILURE_BURST: u32 = 10;
const MAX_TRACKED: usize = 4096;

impl FailureLimit {
    fn buckets(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        lock(&self.buckets)
    }

    /// Count one failed attempt from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut g = self.buckets();
        if !g.contains_key(&ip) && g.len() >= MAX_TRACKED {
            g.retain(|_, b| b.available(now) < f64::from(FAILURE_BURST));
            if g.len() >= MAX_TRACKED {
                // Every tracked address is guessing: forget the one closest to full.
                if let Some(k) = g
                    .iter_mut()
                    .map(|(k, b)| (*k, b.available(now)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(k, _)| k)
                {
                    g.remove(&k);
                }
            }
        }
        let _ = g
            .entry(ip)
            .or_insert_with(|| Bucket::new(FAILURE_RATE, FAILURE_BURST))
            .try_take(now);
    }

    /// Refused when `ip` has used up its failures: it may not try again yet.
    pub fn check(&self, ip: IpAddr) -> Result<(), RpcError> {
        let left = self
            .buckets()
            .get_mut(&ip)
            .map(|b| b.available(Instant::now()));
        match left {
            Some(n) if n < 1.0 => Err(RpcError::new(
                Kind::RateLimited,
                "too many failed authentications from this address: wait a moment",
            )),
            _ => Ok(()),
        }
    }
}

/// How long a successful token check is reused. The broker's answer is the truth (the store
/// lives with it, `carapace token revoke` changes it); reusing an answer is what lets a client
/// make many calls a second without an `auth` each, and this bound is how late a revocation
/// may be felt: a second, on every connection (WebSockets re-check on their calls and on a
/// timer, see `ws`).
pub const AUTH_REUSE: Duration = Duration::from_secs(1);

/// Token checks remembered at once; beyond, the oldest is forgotten. Only tokens the broker
/// accepted are remembered (a refused one never is), so this bounds the memory of many
/// connected clients, and garbage tokens cannot fill it (they also meet [`FailureLimit`]).
pub const AUTH_CACHE_MAX: usize = 4096;

/// Recent successful token checks, by the token's SHA-256 (never the token), and one check at
/// a time per token (concurrent calls with the same token wait for the one check in flight).
#[derive(Debug, Default)]
pub struct AuthCache {
    checked: Mutex<HashMap<String, (Instant, Caller)>>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AuthCache {
    /// The caller of `hash` when it was checked less than [`AUTH_REUSE`] before `now`.
    pub fn get(&self, hash: &str, now: Instant) -> Option<Caller> {
        let g = lock(&self.checked);
        let (at, c) = g.get(hash)?;
        (now.saturating_duration_since(*at) < AUTH_REUSE).then(|| c.clone())
    }

    /// Remember that the broker accepted `hash` as `caller` at `at` (when it was asked).
    pub fn put(&self, hash: &str, caller: Caller, at: Instant) {
        let mut g = lock(&self.checked);
        if !g.contains_key(hash) && g.len() >= AUTH_CACHE_MAX {
            g.retain(|_, (t, _)| at.saturating_duration_since(*t) < AUTH_REUSE);
            if g.len() >= AUTH_CACHE_MAX {
                if let Some(k) = g
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(k, _)| k.clone())
                {
                    g.remove(&k);
                }
            }
        }
        g.insert(hash.to_string(), (at, caller));
    }

    /// Forget `hash` (the broker refused it).
    pub fn forget(&self, hash: &str) {
        lock(&self.checked).remove(hash);
    }

    /// Remembered checks.
    pub fn len(&self) -> usize {
        lock(&self.checked).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lock of `hash`'s check: hold it while asking the broker.
    pub fn flight(&self, hash: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.flights)
            .entry(hash.to_string())
            .or_default()
            .clone()
    }

    /// Done with `flight` (from [`AuthCache::flight`]): dropped from the map when nobody
    /// else holds it.
    pub fn land(&self, hash: &str, flight: Arc<tokio::sync::Mutex<()>>) {
        let mut g = lock(&self.flights);
        // Ours and the map's: nobody else waits on it.
        if Arc::strong_count(&flight) <= 2 {
            g.remove(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: &str) -> Caller {
        Caller {
            token_id: id.into(),
            name: "n".into(),
            scope: Scope::Client,
        }
    }

    #[test]
    fn a_check_is_reused_for_a_second_only() {
        let c = AuthCache::default();
        let t0 = Instant::now();
        assert_eq!(c.get("h", t0), None);
        c.put("h", caller("1"), t0);
        assert_eq!(
            c.get("h", t0 + Duration::from_millis(999)),
            Some(caller("1"))
        );
        assert_eq!(c.get("h", t0 + AUTH_REUSE), None, "stale after a second");
        assert_eq!(c.get("other", t0), None);
        c.forget("h");
        assert_eq!(c.get("h", t0), None, "a refusal forgets it");
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_oldest() {
        let c = AuthCache::default();
        let t0 = Instant::now();
        for i in 0..AUTH_CACHE_MAX {
            c.put(
                &format!("h{i}"),
                caller("x"),
                t0 + Duration::from_micros(i as u64),
            );
        }
        assert_eq!(c.len(), AUTH_CACHE_MAX);
        let later = t0 + Duration::from_millis(10);
        c.put("new", caller("y"), later);
        assert_eq!(c.len(), AUTH_CACHE_MAX, "still bounded");
        assert_eq!(c.get("h0", later), None, "the oldest went");
        assert!(c.get("h1", later).is_some());
        assert_eq!(c.get("new", later), Some(caller("y")));
        // Stale entries go first: all of them, when the cache is full.
        let much_later = t0 + Duration::from_secs(5);
        c.put("newer", caller("z"), much_later);
        assert_eq!(c.len(), 1, "the stale ones were dropped");
        assert_eq!(c.get("newer", much_later), Some(caller("z")));
    }

    #[tokio::test]
    async fn flights_are_shared_and_dropped_when_done() {
        let c = AuthCache::default();
        let a = c.flight("h");
        let b = c.flight("h");
        assert!(Arc::ptr_eq(&a, &b));
        c.land("h", a);
        assert_eq!(lock(&c.flights).len(), 1, "b still holds it");
        c.land("h", b);
        assert_eq!(lock(&c.flights).len(), 0);
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(Some(b"Bearer abc")), Some("abc".into()));
        assert_eq!(bearer(Some(b"bearer   abc ")), Some("abc".into()));
        assert_eq!(bearer(Some(b"Basic abc")), None);
        assert_eq!(bearer(Some(b"Bearer")), None);
        assert_eq!(bearer(Some(b"Bearer a b")), None);
        assert_eq!(bearer(Some(b"Bearer \xff")), None);
        assert_eq!(bearer(None), None);
        let long = format!("Bearer {}", "a".repeat(300));
        assert_eq!(bearer(Some(long.as_bytes())), None);
    }

    #[test]
    fn query_tokens() {
        assert_eq!(query_token(Some("access_token=xyz")), Some("xyz".into()));
        assert_eq!(
            query_token(Some("a=1&access_token=xyz")),
            Some("xyz".into())
        );
        assert_eq!(query_token(Some("access_token=")), None);
        assert_eq!(query_token(Some("token=xyz")), None);
        assert_eq!(query_token(None), None);
    }

    #[test]
    fn protocol_tokens() {
        let one = |v: &'static str| protocol_token([v.as_bytes()]);
        assert_eq!(
            one("carapace.jsonrpc, carapace.bearer.cpt_abc-_9"),
            Some("cpt_abc-_9".into())
        );
        assert_eq!(one("carapace.bearer.xyz"), Some("xyz".into()));
        assert_eq!(
            protocol_token([&b"carapace.jsonrpc"[..], &b"carapace.bearer.t2"[..]]),
            Some("t2".into()),
            "several headers"
        );
        assert_eq!(one("carapace.jsonrpc"), None);
        assert_eq!(one("carapace.bearer."), None);
        assert_eq!(one("bearer.xyz"), None);
        assert_eq!(protocol_token([&b"carapace.bearer.\xff"[..]]), None);
        assert_eq!(protocol_token(Vec::<&[u8]>::new()), None);
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn failures_are_limited_per_address() {
        let l = FailureLimit::default();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        for _ in 0..9 {
            l.record_failure(a);
        }
        assert!(l.check(a).is_ok(), "a tenth attempt is allowed");
        l.record_failure(a);
        assert_eq!(l.check(a).map_err(|e| e.kind), Err(Kind::RateLimited));
        assert!(l.check(b).is_ok(), "another address is not affected");
    }

    #[test]
    fn scopes() {
        let c = Caller {
            token_id: "1".into(),
            name: "n".into(),
            scope: Scope::Client,
        };
        assert_eq!(
            c.require_operator("approvals.list").map_err(|e| e.kind),
            Err(Kind::Forbidden)
        );
        let o = Caller {
            scope: Scope::Operator,
            ..c
        };
        assert!(o.require_operator("approvals.list").is_ok());
    }
}
