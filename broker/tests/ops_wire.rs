//! The operations behind the real server and client, over SOCK_SEQPACKET socketpairs: the fds
//! cross the socket, and each peer is decided by the identity bound to its socket.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use carapace_broker::audit::AuditLog;
use carapace_broker::client::Client;
use carapace_broker::dlq::DeadLetters;
use carapace_broker::ops::{Ops, OpsConfig};
use carapace_broker::protocol::{seqpacket_pair, Access, ErrorCode, SendStatus};
use carapace_broker::server::{Handler, Identity, PeerLimits, Role, Server};
use carapace_policy::Policy;

#[test]
fn ops_over_the_wire() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::fs::create_dir(dir.join("data"))?;
    std::fs::write(dir.join("data/f"), "file body")?;
    std::fs::write(dir.join("key"), "the-secret-value")?;
    std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600))?;
    let d = dir.display();
    let text = format!(
        r#"
version = 1
[profiles.gw]
why = "gateway"
[profiles.gw.broker]
connect = [ {{ host = "127.0.0.1", port = {port}, allow_private = true, why = "test" }} ]
open = [ {{ path = "{d}/data", access = "read", why = "data" }} ]
secrets = ["key"]
channels = ["out"]
[profiles.tool]
why = "tool"
[profiles.tool.broker]
channels = ["out"]
[secrets.key]
why = "k"
file = "{d}/key"
[channels.out]
why = "o"
kind = "file"
path = "{d}/out.log"
recipients = ["ok@example.com"]
"#
    );
    let policy = Policy::parse(&text, "wire.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let ops = Ops::new(
        policy,
        AuditLog::open(dir.join("audit.log"))?,
        DeadLetters::open(dir.join("dlq"))?,
        None,
        None,
        OpsConfig::default(),
    )?;
    let handler: Arc<dyn Handler> = Arc::new(ops);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = Server::new(handler, PeerLimits::default());
    let (gw_child, gw_broker) = seqpacket_pair()?;
    let (tool_child, tool_broker) = seqpacket_pair()?;
    {
        let _g = rt.enter();
        server.serve_peer(
            gw_broker,
            Identity {
                id: 1,
                role: Role::Gateway,
                profile: "gw".into(),
            },
        );
        server.serve_peer(
            tool_broker,
            Identity {
                id: 2,
                role: Role::Tool,
                profile: "tool".into(),
            },
        );
    }
    let mut gw = Client::new(gw_child);
    let mut tool = Client::new(tool_child);
    gw.ping()?;

    // connect: the socket crosses the wire, connected.
    let (fd, peer) = gw.connect("127.0.0.1", port)?;
    assert_eq!(peer, format!("127.0.0.1:{port}"));
    let (mut srv, _) = listener.accept()?;
    std::net::TcpStream::from(fd).write_all(b"hi")?;
    let mut buf = [0u8; 2];
    srv.read_exact(&mut buf)?;
    assert_eq!(&buf, b"hi");
    // The tool's profile has no connect rule: the same request is refused.
    let e = tool.connect("127.0.0.1", port).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));

    // secret: only the gateway's profile names it; the memfd is sealed.
    let (fd, len) = gw.secret("key")?;
    assert_eq!(len, 16);
    let mut f = std::fs::File::from(fd);
    assert!(f.write_all(b"x").is_err());
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    assert_eq!(s, "the-secret-value");
    let e = tool.secret("key").err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::Denied));

    // open
    let mut f = gw.open(&format!("{d}/data/f"), Access::Read)?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    assert_eq!(s, "file body");
    let e = gw.open(&format!("{d}/data/../key"), Access::Read).err();
    assert_eq!(e.and_then(|e| e.code()), Some(ErrorCode::BadRequest));

    // send: allowlisted is delivered, others dead-lettered; secret values redacted.
    let (st, _) = tool.send("out", "ok@example.com", "value the-secret-value here")?;
    assert_eq!(st, SendStatus::Delivered);
    let (st, id) = tool.send("out", "evil@example.com", "x")?;
    assert_eq!(st, SendStatus::DeadLettered);
    assert!(id.is_some());
    let out = std::fs::read_to_string(dir.join("out.log"))?;
    assert!(out.contains("value [REDACTED] here"), "{out}");
    assert!(!out.contains("the-secret-value"));

    // The audit chain verifies and names who asked.
    let report = carapace_broker::audit::verify(dir.join("audit.log"))?;
    assert!(report.is_ok(), "{report}");
    let log = std::fs::read_to_string(dir.join("audit.log"))?;
    assert!(!log.contains("the-secret-value"));
    assert!(log.contains("\"profile\":\"tool\""));
    drop(gw);
    drop(tool);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
