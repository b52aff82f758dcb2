//! Unit tests of `sessions`.

use super::*;

fn store() -> (tempfile::TempDir, Sessions) {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sessions::new(d.path());
    (d, s)
}

#[test]
fn names() {
    for ok in ["a", "chat-1", "A_b", &"x".repeat(64)] {
        assert!(valid_name(ok), "{ok}");
    }
    for bad in [
        "",
        "../x",
        "a/b",
        "a b",
        ".",
        "é",
        &"x".repeat(65),
        "a.jsonl",
    ] {
        assert!(!valid_name(bad), "{bad}");
    }
}

#[test]
fn append_read_list_reset() {
    let (_d, s) = store();
    assert!(s.list().unwrap_or_default().is_empty());
    assert!(s.messages("chat").unwrap_or_default().is_empty());
    let m1 = json!({"role":"user","content":"hi"});
    let m2 = json!({"role":"assistant","content":"hello"});
    s.append_message("chat", &m1)
        .unwrap_or_else(|e| panic!("{e}"));
    s.append_message("chat", &m2)
        .unwrap_or_else(|e| panic!("{e}"));
    let u = Usage {
        prompt_tokens: 10,
        completion_tokens: 5,
        total_tokens: 15,
    };
    s.append_usage("chat", &u, 1, "done", None)
        .unwrap_or_else(|e| panic!("{e}"));
    s.append_usage("chat", &u, 2, "done", None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.messages("chat").unwrap_or_default(), vec![m1, m2]);
    let l = s.list().unwrap_or_default();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["name"], "chat");
    assert_eq!(l[0]["messages"], 2);
    assert_eq!(l[0]["usage"]["total_tokens"], 30);
    assert!(s.reset("chat").unwrap_or(None).is_some());
    assert_eq!(s.reset("chat").ok(), Some(None));
    assert!(s.list().unwrap_or_default().is_empty());
}

#[test]
fn reset_archives_and_restore_brings_back_intact() {
    let (d, s) = store();
    for i in 0..3 {
        s.append_message("chat", &json!({"role":"user","content":format!("m{i}")}))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let before = fs::read(d.path().join("sessions/chat.jsonl")).unwrap_or_default();
    let id = s
        .reset("chat")
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("nothing archived"));
    assert!(!s.exists("chat").unwrap_or(true));
    assert_eq!(parse_archive_id(&id).map(|(n, _)| n), Some("chat"));
    let listed = s.archived().unwrap_or_default();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["archive"], id.as_str());
    assert_eq!(listed[0]["session"], "chat");
    assert_eq!(listed[0]["messages"], 3);
    assert_eq!(s.read_archived(&id).map(|l| l.lines.len()).ok(), Some(3));

    // A second reset of a new session of the same name is another archive.
    s.append_message("chat", &json!({"role":"user","content":"new"}))
        .unwrap_or_else(|e| panic!("{e}"));
    // Restoring over a live session is refused, and both stay as they were.
    assert!(matches!(s.restore(&id), Err(SessionError::Live(_))));
    assert_eq!(s.messages("chat").unwrap_or_default().len(), 1);
    let id2 = s.reset("chat").ok().flatten().unwrap_or_default();
    assert_ne!(id, id2);
    assert_eq!(s.archived().unwrap_or_default().len(), 2);

    assert_eq!(s.restore(&id).ok().as_deref(), Some("chat"));
    let after = fs::read(d.path().join("sessions/chat.jsonl")).unwrap_or_default();
    assert_eq!(before, after, "restored byte for byte");
    assert_eq!(s.archived().unwrap_or_default().len(), 1);
    assert!(matches!(s.restore(&id), Err(SessionError::NoArchive(_))));
    for bad in ["chat", "../x.1", "a.b/c", "a..", "a.../x", ".x"] {
        assert!(
            matches!(s.restore(bad), Err(SessionError::BadArchive(_))),
            "{bad}"
        );
    }
}

#[test]
fn context_is_the_last_summary_and_what_follows_it() {
    let (_d, s) = store();
    let u = Usage::default();
    for i in 1..=4 {
        s.append_message("c", &json!({"role":"user","content":format!("m{i}")}))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let c = s.context("c").unwrap_or_default();
    assert_eq!(c.summary, None);
    assert_eq!(
        c.messages.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    s.append_summary("c", [1, 2], "first two", &u)
        .unwrap_or_else(|e| panic!("{e}"));
    s.append_message("c", &json!({"role":"user","content":"m6"}))
        .unwrap_or_else(|e| panic!("{e}"));
    let c = s.context("c").unwrap_or_default();
    assert_eq!(
        c.summary,
        Some(Summary {
            text: "first two".into(),
            covers: [1, 2]
        })
    );
    let contents: Vec<&str> = c
        .messages
        .iter()
        .filter_map(|(_, m)| m["content"].as_str())
        .collect();
    assert_eq!(contents, ["m3", "m4", "m6"]);
    // Nothing is cut from the file.
    assert_eq!(s.messages("c").unwrap_or_default().len(), 5);
    s.append_summary("c", [1, 4], "all four", &u)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = s.context("c").unwrap_or_default();
    assert_eq!(c.summary.map(|x| x.text).as_deref(), Some("all four"));
    assert_eq!(c.messages.len(), 1);
}

#[test]
fn a_torn_line_is_skipped_and_counted() {
    let (d, s) = store();
    s.append_message("t", &json!({"role":"user","content":"a"}))
        .unwrap_or_else(|e| panic!("{e}"));
    let p = d.path().join("sessions/t.jsonl");
    let mut f = OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap_or_else(|e| panic!("{e}"));
    f.write_all(b"{\"ts\":\"x\",\"kind\":\"mess")
        .unwrap_or_else(|e| panic!("{e}"));
    let r = s.read("t").unwrap_or_default();
    assert_eq!((r.lines.len(), r.unreadable), (1, 1));
    assert_eq!(s.messages("t").unwrap_or_default().len(), 1);
}

#[test]
fn bad_names_are_refused_everywhere() {
    let (_d, s) = store();
    assert!(matches!(
        s.read("../etc/passwd"),
        Err(SessionError::BadName(_))
    ));
    assert!(matches!(
        s.append_message("a/b", &json!({})),
        Err(SessionError::BadName(_))
    ));
    assert!(matches!(s.reset(""), Err(SessionError::BadName(_))));
}

fn tagged(id: &str, content: &str) -> Value {
    json!({"kind":"message","message":{"role":"user","content":content},"inbound":{"id":id}})
}
fn msg(role: &str, content: Value) -> Value {
    json!({"kind":"message","message":{"role":role,"content":content}})
}
fn usage(id: &str, stopped: &str) -> Value {
    json!({"kind":"usage","inbound_id":id,"stopped":stopped})
}

#[test]
fn inbound_states() {
    let call = json!({"kind":"message","message":{"role":"assistant","content":null,"tool_calls":[{"id":"c"}]}});
    let tool = msg("tool", json!("out"));
    let cases: Vec<(Vec<Value>, InboundState)> = vec![
        (vec![], InboundState::New),
        (vec![tagged("b", "x")], InboundState::New),
        (vec![tagged("a", "x")], InboundState::Started),
        (
            vec![tagged("a", "x"), call.clone(), tool.clone()],
            InboundState::Started,
        ),
        // A failed attempt is not an end.
        (
            vec![tagged("a", "x"), usage("a", "error")],
            InboundState::Started,
        ),
        (
            vec![
                tagged("a", "x"),
                call.clone(),
                tool.clone(),
                msg("assistant", json!("hello")),
                usage("a", "done"),
            ],
            InboundState::Ran {
                stopped: "done".into(),
                reply: Some("hello".into()),
            },
        ),
        // Stopped at a limit: no reply text even if some was said on the way.
        (
            vec![
                tagged("a", "x"),
                json!({"kind":"message","message":{"role":"assistant","content":"let me see","tool_calls":[{"id":"c"}]}}),
                tool.clone(),
                usage("a", "turn_limit"),
            ],
            InboundState::Ran {
                stopped: "turn_limit".into(),
                reply: None,
            },
        ),
        // A final answer stored just before a crash.
        (
            vec![tagged("a", "x"), msg("assistant", json!("hi"))],
            InboundState::Ran {
                stopped: "done".into(),
                reply: Some("hi".into()),
            },
        ),
        // The usage line of another message does not end this one.
        (
            vec![tagged("a", "x"), call, tool, usage("b", "done")],
            InboundState::Started,
        ),
        (
            vec![
                tagged("a", "x"),
                msg("assistant", json!("hi")),
                usage("a", "done"),
                json!({"kind":"inbound_done","inbound_id":"a"}),
            ],
            InboundState::Done,
        ),
    ];
    for (lines, want) in cases {
        assert_eq!(inbound_state(&lines, "a"), want, "{lines:?}");
    }
}

#[test]
fn tagged_lines_are_read_back() {
    let (_d, s) = store();
    let mut tag = serde_json::Map::new();
    tag.insert("inbound".into(), json!({"id": "m1", "seq": 3}));
    s.append_tagged_message("c", &json!({"role":"user","content":"q"}), &tag)
        .unwrap_or_else(|e| panic!("{e}"));
    s.append_message("c", &json!({"role":"assistant","content":"a"}))
        .unwrap_or_else(|e| panic!("{e}"));
    s.append_usage("c", &Usage::default(), 1, "done", Some("m1"))
        .unwrap_or_else(|e| panic!("{e}"));
    let lines = s.read("c").unwrap_or_default().lines;
    assert_eq!(
        inbound_state(&lines, "m1"),
        InboundState::Ran {
            stopped: "done".into(),
            reply: Some("a".into())
        }
    );
    s.append_inbound_done("c", "m1", "replied", json!({"status": "queued"}))
        .unwrap_or_else(|e| panic!("{e}"));
    let lines = s.read("c").unwrap_or_default().lines;
    assert_eq!(inbound_state(&lines, "m1"), InboundState::Done);
    assert_eq!(inbound_state(&lines, "m2"), InboundState::New);
    // Tags only add: they never replace the line's own fields.
    assert_eq!(lines[0]["kind"], "message");
    assert_eq!(s.messages("c").unwrap_or_default().len(), 2);
}

#[test]
fn content_texts() {
    assert_eq!(content_text(&json!("a")).as_deref(), Some("a"));
    assert_eq!(
        content_text(&json!([{"type":"text","text":"a"},{"type":"image"},{"text":"b"}])).as_deref(),
        Some("ab")
    );
    assert_eq!(content_text(&Value::Null), None);
}

#[test]
fn sessions_are_claimed_by_their_first_owner() {
    let (_d, s) = store();
    let alice = crate::owner::Owner::Token("aaaa0001".into());
    let bob = crate::owner::Owner::Token("bbbb0002".into());
    assert_eq!(s.owner("chat").unwrap_or_default(), None);
    assert_eq!(s.claim("chat", &alice).ok(), Some(Claim::Mine));
    assert_eq!(
        s.owner("chat").unwrap_or_default().as_deref(),
        Some("token:aaaa0001")
    );
    assert_eq!(s.claim("chat", &alice).ok(), Some(Claim::Mine), "again");
    assert_eq!(s.claim("chat", &bob).ok(), Some(Claim::Taken));
    // Kept across a reset: the name stays its owner's.
    s.append_message("chat", &json!({"role":"user","content":"x"}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.reset("chat").ok().flatten().is_some());
    assert_eq!(s.claim("chat", &bob).ok(), Some(Claim::Taken));
    // A session written without an owner (before owners) is nobody's to claim.
    s.append_message("old", &json!({"role":"user","content":"x"}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.claim("old", &alice).ok(), Some(Claim::Taken));
    assert_eq!(s.owner("old").unwrap_or_default(), None);
    // The list says whose each is, and a channel owner reads as such.
    let ch = crate::owner::Owner::Channel {
        channel: "tg".into(),
        conversation: "42".into(),
    };
    assert_eq!(ch.key(), "channel:tg:42");
    assert_eq!(s.claim("ch-x", &ch).ok(), Some(Claim::Mine));
    s.append_message("ch-x", &json!({"role":"user","content":"x"}))
        .unwrap_or_else(|e| panic!("{e}"));
    let l = s.list().unwrap_or_default();
    let owners: Vec<(String, Value)> = l
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("").to_string(),
                v["owner"].clone(),
            )
        })
        .collect();
    assert_eq!(
        owners,
        vec![
            ("ch-x".to_string(), json!("channel:tg:42")),
            ("old".to_string(), Value::Null)
        ]
    );
    assert!(matches!(s.owner("../x"), Err(SessionError::BadName(_))));
}

#[test]
fn an_unreadable_owner_file_is_an_error_not_a_claim() {
    let (d, s) = store();
    fs::create_dir_all(d.path().join("sessions")).unwrap_or_else(|e| panic!("{e}"));
    fs::write(d.path().join("sessions/x.meta.json"), "not json").unwrap_or_else(|e| panic!("{e}"));
    assert!(s.owner("x").is_err());
    assert!(s
        .claim("x", &crate::owner::Owner::Token("a".into()))
        .is_err());
}
