//! `redact` (profiles with `auth = true`: gateways): where a text the gateway is about to hand
//! out — an agent's answer to a client or a channel — holds a known secret value (every form
//! [`crate::redact::Redactor`] recognises: raw, hex, percent, JSON, base64) or a match of the
//! profile's `redact` patterns. The broker answers with byte ranges, never with a secret, and
//! the gateway replaces them. A text with something to hide is audited (how many ranges, never
//! the text); a clean one is a read and is not.
//!
//! Only gateways may ask: any other child could use the op to test guesses of secret values it
//! was not given.

use crate::audit::AuditDecision;
use crate::protocol::{ErrorCode, OkReply, MAX_REDACT_TEXT};
use crate::server::{Identity, Response};

use super::{Audited, Ops};

/// Ranges sent back at most; beyond, the span from the first to the last is one range (more is
/// hidden, never less).
const MAX_RANGES: usize = 1024;

/// The profile's patterns over `text`, merged with `secret` ranges; sorted, merged, capped.
pub(crate) fn merge_ranges(
    text: &str,
    mut ranges: Vec<(usize, usize)>,
    patterns: &[regex::Regex],
) -> Vec<(usize, usize)> {
    for re in patterns {
        ranges.extend(
            re.find_iter(text)
                .map(|m| (m.start(), m.end()))
                .filter(|(a, b)| a < b),
        );
    }
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    if out.len() > MAX_RANGES {
        let (first, last) = (out[0].0, out[out.len() - 1].1);
        out = vec![(first, last)];
    }
    out
}

impl Ops {
    /// The `redact` operation.
    pub async fn redact_op(&self, who: &Identity, text: &str) -> Response {
        let rules = match self.rules_for(who, "redact", "reply").await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        if !rules.auth {
            return self
                .refuse(
                    who,
                    Audited::refused(
                        "redact",
                        "reply",
                        AuditDecision::Deny,
                        "the profile may not use redact",
                    ),
                    ErrorCode::Denied,
                    format!(
                        "redact: profile `{}` may not use it (gateways only: `auth = true`)",
                        who.profile
                    ),
                )
                .await;
        }
        if text.len() > MAX_REDACT_TEXT {
            return Response::err(
                ErrorCode::TooLarge,
                format!("redact: at most {MAX_REDACT_TEXT} bytes of text at once"),
            );
        }
        let secrets = self.redactor().ranges(text.as_bytes());
        let ranges = merge_ranges(text, secrets, &rules.redact);
        if !ranges.is_empty() {
            let hidden: usize = ranges.iter().map(|(a, b)| b - a).sum();
            let a = Audited::of("redact", "reply").allow(
                "redacted",
                format!(
                    "{} range(s), {hidden} of {} bytes hidden",
                    ranges.len(),
                    text.len()
                ),
            );
            if self.audit(who, a).await.is_err() {
                // The answer is still redacted: hiding is what the caller asked for.
                tracing::warn!("the audit log cannot be written: a redaction is not recorded");
            }
        }
        Response::ok(OkReply::Redact { ranges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_sort_and_cap() {
        let re = regex::Regex::new("sk-[a-z]{4}").unwrap_or_else(|e| panic!("{e}"));
        let text = "a sk-abcd b XYZ c";
        // A secret range overlapping a pattern range becomes one.
        let r = merge_ranges(text, vec![(12, 15), (4, 8)], std::slice::from_ref(&re));
        assert_eq!(r, vec![(2, 9), (12, 15)]);
        assert!(merge_ranges("clean", vec![], &[re]).is_empty());
        let many: Vec<(usize, usize)> = (0..2000).map(|i| (i * 2, i * 2 + 1)).collect();
        assert_eq!(merge_ranges("", many, &[]), vec![(0, 3999)]);
    }
}
