//! Unit tests of `wiring`.

use super::*;

fn wiring(config: &str, policy_extra: &str) -> Wiring {
    let cfg = Config::parse(config, "c.toml").expect("config");
    let text = format!("{}\n{policy_extra}\n", crate::embedded::DEFAULT_POLICY);
    let policy = Policy::parse(&text, "p.toml").expect("policy");
    check(&cfg, &policy)
}

const CONFIG: &str = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "telegram"
profile = "tg"
token_secret = "bot"
api_base = "http://127.0.0.1:8081"
"#;

const GOOD: &str = r#"
[secrets.bot]
why = "bot token"
file = "/etc/carapace/bot"
[channels.tg]
why = "telegram"
kind = "adapter"
recipients = []
reply_to_senders = true
[profiles.tg]
why = "adapter"
extends = "channel"
[profiles.tg.broker]
connect = [{ host = "127.0.0.1", port = 8081, allow_private = true, why = "the fake API" }]
secrets = ["bot"]
deliver = ["tg"]
[profiles.agent]
why = "gateway"
extends = "gateway"
[profiles.agent.broker]
channels = ["tg"]
"#;

#[test]
fn a_wired_channel_passes() {
    assert_eq!(wiring(CONFIG, GOOD), Wiring::default());
}

#[test]
fn each_missing_wire_is_named() {
    let w = wiring(CONFIG, &GOOD.replace("deliver = [\"tg\"]", ""));
    assert!(
        w.errors.iter().any(|e| e.contains("does not `deliver`")),
        "{w:?}"
    );
    let w = wiring(CONFIG, &GOOD.replace("secrets = [\"bot\"]", ""));
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("may not fetch that secret")),
        "{w:?}"
    );
    let w = wiring(CONFIG, &GOOD.replace("port = 8081", "port = 8082"));
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("may not connect to 127.0.0.1:8081")),
        "{w:?}"
    );
    let w = wiring(CONFIG, &GOOD.replace("channels = [\"tg\"]", ""));
    assert!(w.errors.is_empty(), "{w:?}");
    assert!(
        w.warnings.iter().any(|e| e.contains("cannot answer")),
        "{w:?}"
    );
    let file_kind = GOOD.replace(
        "kind = \"adapter\"\nrecipients = []\nreply_to_senders = true",
        "kind = \"file\"\npath = \"/tmp/x\"\nrecipients = []",
    );
    let w = wiring(CONFIG, &file_kind);
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("is not kind = \"adapter\"")),
        "{w:?}"
    );
}

#[test]
fn endpoints_of_each_kind() {
    let e = |v: serde_json::Value| endpoints(&v);
    assert_eq!(
        e(serde_json::json!({"kind": "telegram"})),
        vec![("api.telegram.org".to_string(), 443)]
    );
    assert_eq!(
        e(serde_json::json!({"kind": "email", "imap": "[::1]:143", "smtp": "m.example:587"})),
        vec![("[::1]".to_string(), 143), ("m.example".to_string(), 587)]
    );
    assert_eq!(
        e(serde_json::json!({"kind": "webhook", "url": "http://127.0.0.1:9/r"})),
        vec![("127.0.0.1".to_string(), 9)]
    );
    assert!(e(serde_json::json!({"kind": "webhook"})).is_empty());
    assert_eq!(
        e(serde_json::json!({"kind": "discord"})),
        vec![
            ("discord.com".to_string(), 443),
            ("gateway.discord.gg".to_string(), 443)
        ]
    );
    assert_eq!(
        e(
            serde_json::json!({"kind": "discord", "api_base": "http://127.0.0.1:7/api/v10",
                             "gateway_url": "ws://127.0.0.1:8"})
        ),
        vec![("127.0.0.1".to_string(), 7), ("127.0.0.1".to_string(), 8)]
    );
}

#[test]
fn a_discord_channel_needs_both_of_its_services_and_a_user_id_operator() {
    let config = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "discord"
profile = "tg"
token_secret = "bot"
api_base = "http://127.0.0.1:8081/api/v10"
gateway_url = "ws://127.0.0.1:8082"
"#;
    let w = wiring(config, GOOD);
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("may not connect to 127.0.0.1:8082")),
        "{w:?}"
    );
    let both = GOOD.replace(
        "connect = [{ host = \"127.0.0.1\", port = 8081, allow_private = true, why = \"the fake API\" }]",
        "connect = [{ host = \"127.0.0.1\", port = 8081, allow_private = true, why = \"the fake API\" }, { host = \"127.0.0.1\", port = 8082, allow_private = true, why = \"the fake Gateway\" }]",
    );
    assert_eq!(wiring(config, &both), Wiring::default());
    let with = |op: &str| {
        both.replace(
            "reply_to_senders = true",
            &format!("reply_to_senders = true\noperator = \"{op}\""),
        )
    };
    assert_eq!(
        wiring(config, &with("80351110224678912")),
        Wiring::default()
    );
    for bad in ["@owner", "owner#0001", "99999999999999999999999"] {
        let w = wiring(config, &with(bad));
        assert!(
            w.errors.iter().any(|e| e.contains("not a Discord user id")),
            "{bad}: {w:?}"
        );
    }
}

#[test]
fn the_gateway_is_told_its_broker_budget() {
    let policy = Policy::parse(crate::embedded::DEFAULT_POLICY, "p.toml").expect("policy");
    let s = gateway_settings(r#"{"clients":{"burst":5}}"#, &policy, "gateway");
    let v: serde_json::Value = serde_json::from_str(&s).expect("json");
    assert_eq!(v["clients"]["burst"], 5, "{v}");
    assert_eq!(
        v["broker_rate"],
        serde_json::json!({"requests_per_second": 50, "burst": 100}),
        "{v}"
    );
    // A profile without a rate: no budget (and a stale one is not kept).
    let s = gateway_settings(
        r#"{"broker_rate":{"requests_per_second":1,"burst":1}}"#,
        &policy,
        "tool",
    );
    let v: serde_json::Value = serde_json::from_str(&s).expect("json");
    assert!(v.get("broker_rate").is_none(), "{v}");
    assert_eq!(gateway_settings("[1]", &policy, "gateway"), "[1]");
}

#[test]
fn the_operator_must_be_an_identity_the_adapter_reports() {
    let with = |op: &str| {
        GOOD.replace(
            "reply_to_senders = true",
            &format!("reply_to_senders = true\noperator = \"{op}\""),
        )
    };
    assert_eq!(wiring(CONFIG, &with("123456789")), Wiring::default());
    for bad in ["@owner", "-100123", "12a"] {
        let w = wiring(CONFIG, &with(bad));
        assert!(
            w.errors
                .iter()
                .any(|e| e.contains(&format!("operator \"{bad}\""))
                    && e.contains("not a Telegram user id")),
            "{bad}: {w:?}"
        );
    }
    let mail = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "email"
profile = "tg"
imap = "127.0.0.1:8081"
smtp = "127.0.0.1:8081"
username = "agent"
password_secret = "bot"
from = "agent@example.com"
"#;
    assert_eq!(wiring(mail, &with("owner@example.com")), Wiring::default());
    let w = wiring(mail, &with("Owner@Example.com"));
    assert!(w.errors.iter().any(|e| e.contains("lowercase")), "{w:?}");
    let w = wiring(mail, &with("owner"));
    assert!(
        w.errors.iter().any(|e| e.contains("not an e-mail address")),
        "{w:?}"
    );
}

#[test]
fn a_job_delivers_only_on_a_channel_the_gateway_may_send_on() {
    let cfg = |channel: &str| {
        format!(
            "{CONFIG}[gateway.agent]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\n\
             [[jobs]]\nname = \"daily\"\nevery = \"1h\"\nprompt = \"p\"\n\
             deliver_to = {{ channel = \"{channel}\", conversation = \"111\" }}\n"
        )
    };
    assert_eq!(wiring(&cfg("tg"), GOOD), Wiring::default());
    let w = wiring(&cfg("slack"), GOOD);
    assert_eq!(w.errors.len(), 1, "{w:?}");
    assert!(
        w.errors[0].contains("job `daily`: deliver_to.channel = \"slack\""),
        "{w:?}"
    );
    let w = wiring(&cfg("tg"), &GOOD.replace("channels = [\"tg\"]", ""));
    assert!(w.errors.iter().any(|e| e.contains("job `daily`")), "{w:?}");
}

#[test]
fn granted_workspaces_are_checked_against_the_policy() {
    let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::fs::canonicalize(t.path()).unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "[gateway]\nprofile = \"agent\"\n[workspaces.p]\npath = \"{}\"\n[workspaces.q]\npath = \"{}\"\nprofiles = [\"nosuch\"]\n",
        dir.display(),
        dir.display()
    );
    let agent = "[profiles.agent]\nwhy = \"gateway\"\nextends = \"gateway\"\n";
    let w = wiring(&config, agent);
    assert!(w.errors.is_empty(), "{w:?}");
    assert_eq!(w.warnings.len(), 2, "{w:?}");
    assert!(
        w.warnings.iter().any(|m| m.contains("profile `nosuch`")),
        "{w:?}"
    );
    assert!(
        w.warnings
            .iter()
            .any(|m| m.contains("no `open` rule for workspace `p`")),
        "{w:?}"
    );
    // With an open rule for the directory, only the unknown profile is left.
    let wired = format!(
        "{agent}[profiles.agent.broker]\nopen = [{{ path = \"{}\", access = \"read\", why = \"files\" }}]\n",
        dir.display()
    );
    let w = wiring(&config, &wired);
    assert_eq!(w.warnings.len(), 1, "{w:?}");
    assert!(w.warnings[0].contains("nosuch"), "{w:?}");
}

#[test]
fn an_irc_channel_connects_to_its_server_and_names_a_lowercase_operator() {
    assert_eq!(
        endpoints(&serde_json::json!({"kind": "irc", "server": "127.0.0.1:8081"})),
        vec![("127.0.0.1".to_string(), 8081)]
    );
    let with = |op: &str| {
        GOOD.replace(
            "reply_to_senders = true",
            &format!("reply_to_senders = true\noperator = \"{op}\""),
        )
    };
    let irc = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "irc"
profile = "tg"
server = "127.0.0.1:8081"
security = "plain"
nick = "agent"
password_secret = "bot"
"#;
    assert_eq!(wiring(irc, &with("alice")), Wiring::default());
    for (bad, why) in [
        ("Alice", "IRC lower case"),
        ("al~ce", "IRC lower case"),
        ("#chan", "not an IRC nick"),
        ("a b", "not an IRC nick"),
        ("unidentified:alice", "without an account"),
    ] {
        let w = wiring(irc, &with(bad));
        assert!(w.errors.iter().any(|e| e.contains(why)), "{bad}: {w:?}");
    }
    // The server must be one the profile may connect to.
    let w = wiring(&irc.replace("8081", "6697"), &with("alice"));
    assert!(!w.errors.is_empty(), "{w:?}");
}

#[test]
fn a_signal_operator_is_a_number_or_an_account_uuid() {
    let signal = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "signal"
profile = "tg"
account = "+15550001111"
"#;
    let with = |op: &str| {
        GOOD.replace(
            "reply_to_senders = true",
            &format!("reply_to_senders = true\noperator = \"{op}\""),
        ) + "[profiles.signal-cli]\nwhy = \"signal-cli\"\n"
    };
    for good in ["+15550002222", "0b1c9a47-2f6e-4d7a-9a4e-6f3c2d1b0a99"] {
        assert_eq!(wiring(signal, &with(good)), Wiring::default(), "{good}");
    }
    for bad in [
        "15550002222",
        "+1555abc",
        "0B1C9A47-2F6E-4D7A-9A4E-6F3C2D1B0A99",
        "owner",
    ] {
        let w = wiring(signal, &with(bad));
        assert!(
            w.errors
                .iter()
                .any(|e| e.contains(&format!("operator \"{bad}\"")) && e.contains("phone number")),
            "{bad}: {w:?}"
        );
    }
}

#[test]
fn a_slack_channel_needs_both_secrets_its_api_host_and_a_slack_operator() {
    let slack = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "slack"
profile = "tg"
app_token_secret = "bot"
bot_token_secret = "bot"
api_base = "http://127.0.0.1:8081/api"
"#;
    assert_eq!(wiring(slack, GOOD), Wiring::default());
    assert_eq!(
        endpoints(&serde_json::json!({"kind": "slack"})),
        vec![("slack.com".to_string(), 443)]
    );
    // A secret the profile may not fetch.
    let w = wiring(
        &slack.replace("bot_token_secret = \"bot\"", "bot_token_secret = \"xoxb\""),
        GOOD,
    );
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("`bot_token_secret` = \"xoxb\"")),
        "{w:?}"
    );
    // The operator is a Slack user id.
    let with = |op: &str| {
        GOOD.replace(
            "reply_to_senders = true",
            &format!("reply_to_senders = true\noperator = \"{op}\""),
        )
    };
    assert_eq!(wiring(slack, &with("U0123ABCD")), Wiring::default());
    assert_eq!(wiring(slack, &with("W0123ABCD")), Wiring::default());
    for bad in ["123456789", "u0123abcd", "C0123ABCD", "@alice"] {
        let w = wiring(slack, &with(bad));
        assert!(
            w.errors.iter().any(|e| e.contains("not a Slack user id")),
            "{bad}: {w:?}"
        );
    }
}

#[test]
fn a_matrix_operator_is_a_full_mxid_and_the_homeserver_must_be_reachable() {
    let with = |op: &str| {
        GOOD.replace(
            "reply_to_senders = true",
            &format!("reply_to_senders = true\noperator = \"{op}\""),
        )
    };
    let mx = r#"
[gateway]
profile = "agent"
[channels.tg]
kind = "matrix"
profile = "tg"
homeserver = "http://127.0.0.1:8081"
token_secret = "bot"
"#;
    assert_eq!(wiring(mx, &with("@owner:example.org")), Wiring::default());
    for bad in ["owner", "@owner", "123456789", "@:example.org"] {
        let w = wiring(mx, &with(bad));
        assert!(
            w.errors
                .iter()
                .any(|e| e.contains(&format!("operator \"{bad}\""))
                    && e.contains("not a Matrix user id")),
            "{bad}: {w:?}"
        );
    }
    let w = wiring(&mx.replace("8081", "8082"), GOOD);
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("may not connect to 127.0.0.1:8082")),
        "{w:?}"
    );
}
