//! Unit tests of `broker`.

use super::*;
use crate::Policy;

const BASE: &str = r##"
version = 1
[profiles.tool]
why = "tools"
[profiles.tool.broker]
connect = [ { host = "api.example.com", port = 443, why = "the API" },
            { host = "*.example.org", port = 443, why = "its mirrors" },
            { host = "127.0.0.1", port = 8080, allow_private = true, why = "local test API" },
            { host = "::1", port = 8081, allow_private = true, why = "v6 loopback" },
            { host = "intranet.example.net", port = 80, allow_private = true, why = "internal" } ]
open = [ { path = "/srv/data", access = "read", why = "inputs" },
         { path = "/srv/data/out", access = "create", why = "outputs" } ]
secrets = ["openai_key"]
channels = ["log"]
exec = true
rate = { requests_per_second = 50, burst = 100 }
[profiles.child]
why = "more"
extends = "tool"
[profiles.child.broker]
connect = [ { host = "extra.example.com", port = 443, why = "more" } ]
secrets = ["other"]
[profiles.gw]
why = "a gateway"
extends = "tool"
[profiles.gw.broker]
auth = true
approve = true
[profiles.gwchild]
why = "a gateway that may not approve"
extends = "gw"
[profiles.gwchild.broker]
approve = false
[profiles.adapter]
why = "a channel adapter"
[profiles.adapter.broker]
deliver = ["log"]
inbound = true
[profiles.adapter2]
why = "an adapter for two channels that may not read the queue"
extends = "adapter"
[profiles.adapter2.broker]
deliver = ["inbox", "log"]
inbound = false
[profiles.plain]
why = "no broker"
[secrets.openai_key]
why = "the API key"
file = "/etc/carapace/secrets/openai_key"
[secrets.other]
why = "another"
credential = "other"
[channels.log]
why = "a log"
kind = "file"
path = "/var/lib/carapace/outbox.log"
recipients = ["alice@example.com", "#ops*"]
block = ["(?i)password\\s*[:=]"]
redact = ["sk-[A-Za-z0-9]{20,}"]
max_bytes = 4096
rate = { per_minute = 10, burst = 5 }
[channels.inbox]
why = "messages from outside"
kind = "file"
path = "/var/lib/carapace/inbox.log"
recipients = []
max_bytes = "2KiB"
"##;

fn rules(profile: &str) -> BrokerRules {
    let p = Policy::parse(BASE, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    p.broker_view(profile)
        .unwrap_or_else(|| panic!("no broker view for {profile}"))
}

/// Errors of BASE with `from` replaced by `to`.
fn errors(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    let text = BASE.replacen(from, to, 1);
    match Policy::parse(&text, "t.toml") {
        Ok(_) => panic!("accepted: {to}"),
        Err(d) => d.to_string(),
    }
}

#[test]
fn parses_and_views() {
    let r = rules("tool");
    assert_eq!(r.connect.len(), 5);
    assert_eq!(r.open.len(), 2);
    assert_eq!(r.secrets.len(), 1);
    assert_eq!(r.channels[0].max_bytes, 4096);
    assert_eq!(
        r.channels[0].rate,
        ChannelRate {
            per_minute: 10,
            burst: 5
        }
    );
    assert!(r.exec);
    assert_eq!(
        r.rate,
        Some(PeerRate {
            requests_per_second: 50,
            burst: 100
        })
    );
    let p = Policy::parse(BASE, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    assert!(p.broker_view("plain").is_none());
    assert!(p.broker_view("nope").is_none());
    assert_eq!(p.secrets().count(), 2);
    assert!(p.explain_broker("plain").contains("no broker socket"));
}

#[test]
fn extends_appends_broker_lists() {
    let r = rules("child");
    assert_eq!(r.connect.len(), 6);
    assert!(r.connect_allowed("api.example.com", 443).is_some());
    assert!(r.connect_allowed("extra.example.com", 443).is_some());
    assert!(r.secret("openai_key").is_some());
    assert!(r.secret("other").is_some());
    assert!(r.channel("log").is_some());
    assert!(r.exec, "exec inherited");
    assert!(!r.auth && !r.approve, "auth and approve are off by default");
    // The parent does not get the child's additions.
    let t = rules("tool");
    assert!(t.secret("other").is_none());
    assert!(t.connect_allowed("extra.example.com", 443).is_none());
}

#[test]
fn auth_and_approve_keys() {
    let t = rules("tool");
    assert!(!t.auth, "auth defaults to false");
    assert!(!t.approve, "approve defaults to false");
    let g = rules("gw");
    assert!(g.auth && g.approve);
    assert!(g.exec, "exec inherited from tool");
    // Inherited, and overridden by the child like `exec`.
    let c = rules("gwchild");
    assert!(c.auth, "auth inherited");
    assert!(!c.approve, "approve overridden by the child");
    let e = g.explain();
    assert!(e.contains("auth: allowed"), "{e}");
    assert!(e.contains("approve: allowed"), "{e}");
    assert!(e.contains("approve its own `ask` requests"), "{e}");
    let e = t.explain();
    assert!(e.contains("auth: refused"), "{e}");
    assert!(e.contains("approve: refused"), "{e}");
}

#[test]
fn deliver_and_inbound_keys() {
    // Defaults: nothing to deliver, no reading of the queue.
    let t = rules("tool");
    assert!(t.deliver.is_empty());
    assert!(t.deliver_channel("log").is_none(), "send is not deliver");
    assert!(!t.inbound);
    let e = t.explain();
    assert!(e.contains("none: every deliver is refused"), "{e}");
    assert!(e.contains("inbound: refused"), "{e}");
    // Resolved into channel specs.
    let a = rules("adapter");
    let log = a
        .deliver_channel("log")
        .unwrap_or_else(|| panic!("log not deliverable"));
    assert_eq!(log.max_bytes, 4096);
    assert!(a.deliver_channel("inbox").is_none());
    assert!(a.channel("log").is_none(), "deliver is not send");
    assert!(a.inbound);
    let e = a.explain();
    assert!(e.contains("log: up to 4 KiB per message"), "{e}");
    assert!(e.contains("inbound: allowed"), "{e}");
    // Through extends: `deliver` appends (no duplicate), `inbound` is overridden.
    let c = rules("adapter2");
    let names: Vec<&str> = c.deliver.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["log", "inbox"]);
    assert_eq!(c.deliver_channel("inbox").map(|c| c.max_bytes), Some(2048));
    assert!(!c.inbound, "inbound overridden by the child");
    // The parent does not get the child's additions.
    assert!(rules("adapter").deliver_channel("inbox").is_none());
}

#[test]
fn connect_matching() {
    let r = rules("tool");
    assert!(r.connect_allowed("api.example.com", 443).is_some());
    assert!(r.connect_allowed("API.Example.com.", 443).is_some());
    assert!(r.connect_allowed("api.example.com", 80).is_none());
    assert!(r.connect_allowed("xapi.example.com", 443).is_none());
    assert!(r.connect_allowed("api.example.com.evil.net", 443).is_none());
    // Wildcard: subdomains at any depth, not the bare suffix, not look-alikes.
    assert!(r.connect_allowed("a.example.org", 443).is_some());
    assert!(r.connect_allowed("a.b.example.org", 443).is_some());
    assert!(r.connect_allowed("example.org", 443).is_none());
    assert!(r.connect_allowed("badexample.org", 443).is_none());
    assert!(r.connect_allowed(".example.org", 443).is_none());
    // IP literals match literally.
    assert!(r.connect_allowed("127.0.0.1", 8080).is_some());
    assert!(r.connect_allowed("127.0.0.2", 8080).is_none());
    assert!(r.connect_allowed("localhost", 8080).is_none());
    assert!(r.connect_allowed("::1", 8081).is_some());
    assert!(r.connect_allowed("[::1]", 8081).is_some());
    assert!(r.connect_allowed("0:0:0:0:0:0:0:1", 8081).is_some());
    assert!(r.connect_allowed("[127.0.0.1]", 8080).is_none());
    // Malformed.
    for bad in [
        "",
        "a b",
        "a..b",
        "-a.com",
        "*.example.org",
        "a\0.example.org",
    ] {
        assert!(r.connect_allowed(bad, 443).is_none(), "{bad:?}");
    }
}

#[test]
fn non_public_addresses() {
    for a in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fc00::1",
        "fd12::1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
    ] {
        let ip: IpAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
        assert!(is_non_public(ip), "{a} should be non-public");
    }
    for a in [
        "1.1.1.1",
        "8.8.8.8",
        "172.32.0.1",
        "100.128.0.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
    ] {
        let ip: IpAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
        assert!(!is_non_public(ip), "{a} should be public");
    }
}

#[test]
fn open_matching() {
    let r = rules("tool");
    let ok = |p: &str, a| {
        r.open_allowed(Path::new(p), a)
            .map(|(r, rest)| (r.dir.clone(), rest.to_path_buf()))
    };
    assert_eq!(
        ok("/srv/data/a.txt", OpenAccess::Read),
        Some(("/srv/data".into(), "a.txt".into()))
    );
    assert!(ok("/srv/data/a.txt", OpenAccess::Write).is_none());
    assert_eq!(
        ok("/srv/data/out/x", OpenAccess::Create),
        Some(("/srv/data/out".into(), "x".into()))
    );
    assert_eq!(
        ok("/srv/data/out/x", OpenAccess::Read),
        Some(("/srv/data/out".into(), "x".into()))
    );
    for bad in [
        "/srv/data",
        "/srv/data/",
        "/srv/data/../etc/passwd",
        "/srv/data/./a",
        "/srv/data//a",
        "srv/data/a",
        "/srv/database/a",
        "/etc/passwd",
    ] {
        assert!(ok(bad, OpenAccess::Read).is_none(), "{bad}");
    }
    let long = format!("/srv/data/{}", "a/".repeat(2100) + "b");
    assert!(ok(&long, OpenAccess::Read).is_none());
}

#[test]
fn channel_filters() {
    let r = rules("tool");
    let c = r.channel("log").unwrap_or_else(|| panic!("no channel"));
    assert!(c.recipient_allowed("alice@example.com").is_some());
    assert!(c.recipient_allowed("#ops-alerts").is_some());
    assert!(c.recipient_allowed("bob@example.com").is_none());
    assert!(c.recipient_allowed("alice@example.com.evil").is_none());
    assert!(c.blocked_by("my Password: x").is_some());
    assert!(c.blocked_by("hello").is_none());
    let (out, n) = c.redact_patterns("key sk-ABCDEFGHIJKLMNOPQRSTUVWX end");
    assert_eq!(out, "key [REDACTED] end");
    assert_eq!(n, 1);
}

#[test]
fn explain_mentions_everything() {
    let e = rules("tool").explain();
    for s in [
        "api.example.com port 443",
        "any subdomain of example.org (not example.org itself)",
        "the address 127.0.0.1 port 8080: private and loopback addresses allowed",
        "beneath /srv/data: read existing files",
        "openai_key from file /etc/carapace/secrets/openai_key",
        "log: appends to /var/lib/carapace/outbox.log",
        "10 per minute (burst 5)",
        "exec: allowed",
        "50 per second, burst 100",
    ] {
        assert!(e.contains(s), "missing {s:?} in\n{e}");
    }
}

#[test]
fn located_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "port = 443, why = \"the API\"",
            "port = 0, why = \"the API\"",
            "bad port 0",
        ),
        (
            "port = 443, why = \"the API\"",
            "port = 65536, why = \"the API\"",
            "bad port 65536",
        ),
        (
            "port = 443, why = \"the API\"",
            "why = \"the API\"",
            "missing required key `port`",
        ),
        ("\"api.example.com\"", "\"api.*.com\"", "bad host pattern"),
        ("\"api.example.com\"", "\"API.example.com\"", "lowercase"),
        ("\"api.example.com\"", "\"*.com\"", "top-level domain"),
        (
            "\"api.example.com\"",
            "\"a_b.example.com\"",
            "bad host pattern",
        ),
        ("\"api.example.com\"", "\"1.2.3\"", "bad host pattern"),
        (
            "\"api.example.com\"",
            "\"[1.2.3.4]\"",
            "IPv6 addresses only",
        ),
        (
            "port = 8080, allow_private = true",
            "port = 8080",
            "non-public address",
        ),
        (
            "\"/srv/data\", access = \"read\"",
            "\"srv/data\", access = \"read\"",
            "relative",
        ),
        (
            "\"/srv/data\", access = \"read\"",
            "\"/srv/../data\", access = \"read\"",
            "`..`",
        ),
        (
            "\"/srv/data\", access = \"read\"",
            "\"/\", access = \"read\"",
            "all of `/`",
        ),
        (
            "access = \"read\"",
            "access = \"exec\"",
            "unknown access `exec`",
        ),
        (
            "secrets = [\"openai_key\"]",
            "secrets = [\"nope\"]",
            "unknown secret `nope`",
        ),
        (
            "channels = [\"log\"]",
            "channels = [\"nope\"]",
            "unknown channel `nope`",
        ),
        (
            "deliver = [\"log\"]",
            "deliver = [\"nope\"]",
            "unknown channel `nope`",
        ),
        (
            "deliver = [\"log\"]",
            "deliver = \"log\"",
            "invalid type: string for `deliver`",
        ),
        (
            "inbound = true",
            "inbound = \"yes\"",
            "invalid type: string for `inbound`",
        ),
        ("exec = true", "exec = true\nfoo = 1", "unknown key `foo`"),
        (
            "exec = true",
            "exec = \"yes\"",
            "invalid type: string for `exec`",
        ),
        (
            "auth = true",
            "auth = \"yes\"",
            "invalid type: string for `auth`",
        ),
        (
            "approve = true",
            "approve = 1",
            "invalid type: integer for `approve`",
        ),
        (
            "requests_per_second = 50",
            "requests_per_second = 0",
            "bad `requests_per_second` 0",
        ),
        ("per_minute = 10", "per_minute = -1", "bad `per_minute` -1"),
        ("burst = 5 }", "burst = 0 }", "bad `burst` 0"),
        (
            "file = \"/etc/carapace/secrets/openai_key\"",
            "file = \"secrets/k\"",
            "relative",
        ),
        (
            "file = \"/etc/carapace/secrets/openai_key\"",
            "",
            "missing required key `file`",
        ),
        (
            "credential = \"other\"",
            "credential = \"../x\"",
            "bad credential name",
        ),
        (
            "credential = \"other\"",
            "credential = \"x\"\nfile = \"/x\"",
            "both `file` and `credential`",
        ),
        (
            "why = \"the API key\"",
            "",
            "missing required key `why` in secret",
        ),
        (
            "kind = \"file\"",
            "kind = \"smtp\"",
            "unknown channel kind `smtp`",
        ),
        (
            "path = \"/var/lib/carapace/outbox.log\"",
            "path = \"outbox.log\"",
            "relative",
        ),
        (
            "path = \"/var/lib/carapace/outbox.log\"",
            "",
            "missing required key `path`",
        ),
        (
            "recipients = [\"alice@example.com\", \"#ops*\"]",
            "",
            "missing required key `recipients`",
        ),
        (
            "recipients = [\"alice@example.com\", \"#ops*\"]",
            "recipients = [\"[a\"]",
            "bad recipient glob",
        ),
        (
            "block = [\"(?i)password\\\\s*[:=]\"]",
            "block = [\"(unclosed\"]",
            "bad `block` pattern",
        ),
        (
            "redact = [\"sk-[A-Za-z0-9]{20,}\"]",
            "redact = [\"a{99999999}\"]",
            "bad `redact` pattern",
        ),
        ("max_bytes = 4096", "max_bytes = 0", "bad max_bytes"),
        ("max_bytes = 4096", "max_bytes = \"2MiB\"", "over 1 MiB"),
        (
            "why = \"a log\"",
            "why = \"a log\"\nsmtp = 1",
            "unknown key `smtp`",
        ),
        ("[secrets.other]", "[secrets.\"o/ther\"]", "bad secret name"),
    ];
    for (from, to, want) in cases {
        let e = errors(from, to);
        assert!(e.contains(want), "{to:?}: want {want:?} in\n{e}");
        // Located: a real line and the source shown.
        assert!(e.contains(" --> t.toml:"), "{e}");
        assert!(!e.contains(" --> t.toml:1:1\n"), "not located: {e}");
    }
}

#[test]
fn error_location_is_exact() {
    let e = errors("port = 443, why", "port = 70000, why");
    let line = BASE
        .lines()
        .position(|l| l.contains("api.example.com"))
        .map(|i| i + 1)
        .unwrap_or(0);
    let col = BASE
        .lines()
        .nth(line - 1)
        .and_then(|l| l.find("443"))
        .map(|c| c + 1)
        .unwrap_or(0);
    assert!(
        e.starts_with(&format!(
            "error: bad port 70000\n --> t.toml:{line}:{col}\n"
        )),
        "{e}"
    );
}

const ADAPTER: &str = r##"
version = 1
[profiles.tg]
why = "the telegram adapter"
[profiles.tg.broker]
deliver = ["telegram"]
[profiles.gw]
why = "the gateway"
[profiles.gw.broker]
channels = ["telegram", "log"]
[channels.telegram]
why = "chat with the operator"
kind = "adapter"
recipients = ["123456789"]
reply_to_senders = true
senders = ["123456789", "*@example.com"]
retry = { attempts = 3, initial_delay = "2s", max_delay = "10s" }
[channels.log]
why = "a log"
kind = "file"
path = "/var/lib/carapace/outbox.log"
recipients = ["#ops"]
"##;

fn adapter_errors(from: &str, to: &str) -> String {
    assert!(ADAPTER.contains(from), "{from}");
    let text = ADAPTER.replacen(from, to, 1);
    match Policy::parse(&text, "t.toml") {
        Ok(_) => panic!("accepted: {to}"),
        Err(d) => d.to_string(),
    }
}

#[test]
fn adapter_channels_senders_and_retry() {
    let p = Policy::parse(ADAPTER, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    let g = p.broker_view("gw").unwrap_or_else(|| panic!("no gw"));
    let tg = g
        .channel("telegram")
        .unwrap_or_else(|| panic!("no telegram"));
    assert_eq!(tg.kind, ChannelKind::Adapter);
    assert!(tg.reply_to_senders);
    assert_eq!(
        tg.retry,
        RetryPolicy {
            attempts: 3,
            initial_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(10),
        }
    );
    // Senders: globs, both directions.
    assert_eq!(tg.sender_admitted("123456789"), Some("123456789"));
    assert_eq!(
        tg.sender_admitted("alice@example.com"),
        Some("*@example.com")
    );
    assert_eq!(tg.sender_admitted("1234567890"), None);
    assert_eq!(tg.sender_admitted("alice@example.org"), None);
    assert_eq!(tg.sender_admitted(""), None);
    assert_eq!(tg.sender_admitted("x\n@example.com"), None);
    // Defaults: no senders (everyone held), no reply_to_senders, the default retry.
    let log = g.channel("log").unwrap_or_else(|| panic!("no log"));
    assert!(log.senders.is_empty());
    assert_eq!(log.sender_admitted("#ops"), None);
    assert!(!log.reply_to_senders);
    assert_eq!(log.retry, DEFAULT_RETRY);
    let a = p.broker_view("tg").unwrap_or_else(|| panic!("no tg"));
    assert!(a.deliver_channel("telegram").is_some());
    let e = a.explain();
    assert!(e.contains("senders 123456789, *@example.com"), "{e}");
    assert!(e.contains("anyone else is held"), "{e}");
    assert!(e.contains("outbox_ack"), "{e}");
    let e = g.explain();
    assert!(e.contains("durable outbox"), "{e}");
    assert!(e.contains("3 tries"), "{e}");
    assert!(e.contains("reply address"), "{e}");
}

#[test]
fn retry_backoff_doubles_up_to_the_cap() {
    let r = RetryPolicy {
        attempts: 10,
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(5),
    };
    let got: Vec<u64> = (1..=5).map(|a| r.delay_after(a).as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 5, 5]);
    assert_eq!(r.delay_after(0).as_secs(), 1);
    assert_eq!(r.delay_after(u32::MAX).as_secs(), 5);
}

#[test]
fn adapter_channel_located_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "kind = \"adapter\"",
            "kind = \"adapter\"\npath = \"/x\"",
            "`path` in channel `telegram`: only for kind \"file\"",
        ),
        (
            "kind = \"file\"",
            "kind = \"file\"\nretry = { attempts = 2 }",
            "`retry` in channel `log`: only for kind \"adapter\"",
        ),
        ("attempts = 3", "attempts = 0", "bad `attempts` 0"),
        ("attempts = 3", "attempts = 101", "bad `attempts` 101"),
        (
            "initial_delay = \"2s\"",
            "initial_delay = \"2 fortnights\"",
            "bad `initial_delay`",
        ),
        (
            "max_delay = \"10s\"",
            "max_delay = \"1s\"",
            "max_delay 1s is shorter than initial_delay 2s",
        ),
        (
            "max_delay = \"10s\"",
            "max_delay = \"2d\"",
            "bad `max_delay`",
        ),
        ("max_delay = \"10s\"", "max_delay = \"25h\"", "over a day"),
        ("attempts = 3,", "attempts = 3, tries = 4,", "tries"),
        (
            "senders = [\"123456789\", \"*@example.com\"]",
            "senders = [\"[a\"]",
            "bad sender glob",
        ),
        (
            "senders = [\"123456789\", \"*@example.com\"]",
            "senders = [\"\"]",
            "bad sender pattern",
        ),
        (
            "senders = [\"123456789\", \"*@example.com\"]",
            "senders = \"123456789\"",
            "senders",
        ),
        (
            "reply_to_senders = true",
            "reply_to_senders = \"yes\"",
            "reply_to_senders",
        ),
        (
            "kind = \"adapter\"",
            "kind = \"telegram\"",
            "\"file\" or \"adapter\"",
        ),
    ];
    for (from, to, want) in cases {
        let e = adapter_errors(from, to);
        assert!(e.contains(want), "{to}: want {want:?} in\n{e}");
    }
    // Located at the offending value.
    let e = adapter_errors("max_delay = \"10s\"", "max_delay = \"1s\"");
    let line = ADAPTER
        .lines()
        .position(|l| l.starts_with("retry ="))
        .map_or(0, |i| i + 1);
    assert!(e.contains(&format!(" --> t.toml:{line}:")), "{e}");
}

#[test]
fn channel_operator_is_one_exact_identity_on_an_adapter_channel() {
    let text = ADAPTER.replacen(
        "reply_to_senders = true",
        "reply_to_senders = true\noperator = \"123456789\"",
        1,
    );
    let p = Policy::parse(&text, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    let g = p.broker_view("gw").unwrap_or_else(|| panic!("no gw"));
    let tg = g.channel("telegram").unwrap_or_else(|| panic!("no tg"));
    assert_eq!(tg.operator.as_deref(), Some("123456789"));
    // Without the key: no operator conversation.
    let log = g.channel("log").unwrap_or_else(|| panic!("no log"));
    assert_eq!(log.operator, None);
    let p = Policy::parse(ADAPTER, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    let tg = p
        .broker_view("gw")
        .and_then(|g| g.channel("telegram").cloned())
        .unwrap_or_else(|| panic!("no tg"));
    assert_eq!(tg.operator, None);

    let cases: &[(&str, &str, &str)] = &[
        (
            "reply_to_senders = true",
            "reply_to_senders = true\noperator = \"\"",
            "the operator identity is empty in channel `telegram`",
        ),
        (
            "reply_to_senders = true",
            "reply_to_senders = true\noperator = \" 1\"",
            "surrounding whitespace",
        ),
        (
            "reply_to_senders = true",
            "reply_to_senders = true\noperator = \"a\\u0007b\"",
            "control characters",
        ),
        (
            "reply_to_senders = true",
            "reply_to_senders = true\noperator = \"*@example.com\"",
            "not a glob",
        ),
        (
            "reply_to_senders = true",
            "reply_to_senders = true\noperator = 123456789",
            "operator",
        ),
        (
            "path = \"/var/lib/carapace/outbox.log\"",
            "path = \"/var/lib/carapace/outbox.log\"\noperator = \"ops\"",
            "`operator` in channel `log`: only for kind \"adapter\"",
        ),
        (
            "reply_to_senders = true",
            "reply_to_senders = true\noperators = \"1\"",
            "operator",
        ),
    ];
    for (from, to, want) in cases {
        let e = adapter_errors(from, to);
        assert!(e.contains(want), "{to}: want {want:?} in\n{e}");
    }
    let long = format!(
        "reply_to_senders = true\noperator = \"{}\"",
        "1".repeat(257)
    );
    let e = adapter_errors("reply_to_senders = true", &long);
    assert!(e.contains("longer than 256 bytes"), "{e}");
    // Located at the value.
    let e = adapter_errors(
        "reply_to_senders = true",
        "reply_to_senders = true\noperator = \"\"",
    );
    let line = ADAPTER
        .lines()
        .position(|l| l.starts_with("reply_to_senders"))
        .map_or(0, |i| i + 2);
    assert!(e.contains(&format!(" --> t.toml:{line}:")), "{e}");
}

#[test]
fn a_profiles_reply_patterns_are_validated_located_and_inherited() {
    let text = BASE.replacen(
        "[profiles.gw.broker]\nauth = true\n",
        "[profiles.gw.broker]\nauth = true\nredact = [\"sk-[A-Za-z0-9]{20,}\"]\n",
        1,
    );
    let text = text.replacen(
        "[profiles.gwchild.broker]\n",
        "[profiles.gwchild.broker]\nredact = [\"(?i)internal-[0-9]+\"]\n",
        1,
    );
    let p = Policy::parse(&text, "t.toml").unwrap_or_else(|d| panic!("{d}"));
    let gw = p.broker_view("gw").unwrap_or_else(|| panic!("no gw"));
    assert_eq!(gw.redact.len(), 1);
    assert!(gw.redact[0].is_match("key sk-ABCDEFGHIJKLMNOPQRSTUVWX"));
    let child = p
        .broker_view("gwchild")
        .unwrap_or_else(|| panic!("no gwchild"));
    assert_eq!(
        child.redact.len(),
        2,
        "the parent's come first, then the child's"
    );
    assert!(child.redact[1].is_match("INTERNAL-42"));
    assert!(rules("tool").redact.is_empty());
    assert!(child.explain().contains("redact"), "{}", child.explain());
    // A bad pattern is refused where it is written.
    let bad = BASE.replacen(
        "[profiles.gw.broker]\nauth = true\n",
        "[profiles.gw.broker]\nauth = true\nredact = [\"(unclosed\"]\n",
        1,
    );
    let e = match Policy::parse(&bad, "t.toml") {
        Ok(_) => panic!("a bad pattern was accepted"),
        Err(d) => d.to_string(),
    };
    let line = bad
        .lines()
        .position(|l| l.contains("(unclosed"))
        .map_or(0, |i| i + 1);
    assert!(e.contains("bad `redact` pattern"), "{e}");
    assert!(e.contains(&format!("t.toml:{line}:")), "{e}");
}

#[test]
fn listing_matches_the_rule_directory_itself_and_beneath() {
    let r = rules("tool");
    let list = |p: &str| {
        r.list_allowed(Path::new(p))
            .map(|(r, rest)| (r.dir.clone(), rest.to_path_buf()))
    };
    assert_eq!(list("/srv/data"), Some(("/srv/data".into(), ".".into())));
    assert_eq!(
        list("/srv/data/sub"),
        Some(("/srv/data".into(), "sub".into()))
    );
    assert_eq!(
        list("/srv/data/out"),
        Some(("/srv/data/out".into(), ".".into()))
    );
    for bad in [
        "/srv",
        "/srv/database",
        "/srv/data/../x",
        "/srv/data/",
        "srv/data",
    ] {
        assert!(list(bad).is_none(), "{bad}");
    }
}

#[test]
fn open_rules_may_ask() {
    let text = BASE.replacen(
        "{ path = \"/srv/data\", access = \"read\", why = \"inputs\" }",
        "{ path = \"/srv/data\", access = \"read\", approval = \"ask\", why = \"inputs\" }",
        1,
    );
    let p = Policy::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let r = p
        .broker_view("tool")
        .unwrap_or_else(|| panic!("no broker view"));
    let asks: Vec<bool> = r.open.iter().map(|o| o.ask).collect();
    assert_eq!(asks, vec![true, false]);
    assert!(r
        .explain()
        .contains("each open after an operator's approval"));
    // The default is allow, and only allow or ask are accepted.
    assert!(rules("tool").open.iter().all(|o| !o.ask));
    let e = errors(
        "access = \"read\", why = \"inputs\"",
        "access = \"read\", approval = \"maybe\", why = \"inputs\"",
    );
    assert!(e.contains("unknown approval `maybe`"), "{e}");
}
