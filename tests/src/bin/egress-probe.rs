//! A program for the brokered-network end-to-end test (`tests/tests/egress_e2e.rs`). Run
//! confined by `carapace run`, it tries what its network namespace lets it do and prints one
//! line, `PROBE {json}`, on its stdout (which the supervisor logs), then waits to be stopped.
//!
//! Usage: `egress-probe HOST PORT`: HOST:PORT is the forwarded name the test's upstream serves
//! behind; the probe exchanges one line with it and tries the places it must not reach.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use serde_json::{json, Value};

/// What an attempt gave: "ok ..." or the error's kind and text.
fn outcome<T>(r: std::io::Result<T>, ok: impl FnOnce(T) -> String) -> Value {
    match r {
        Ok(v) => json!({ "ok": ok(v) }),
        Err(e) => json!({ "err": format!("{:?}", e.kind()), "text": e.to_string() }),
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(3))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(host), Some(port)) = (args.get(1), args.get(2).and_then(|p| p.parse::<u16>().ok()))
    else {
        eprintln!("usage: egress-probe HOST PORT");
        std::process::exit(2);
    };
    let resolved: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    let forwarded = match resolved.first() {
        None => json!({ "err": "NotResolved" }),
        Some(a) => outcome(connect(*a), |s| {
            let mut w = &s;
            let _ = w.write_all(b"hello through the broker\n");
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            line.trim_end().to_string()
        }),
    };
    let other_port = resolved.first().map(|a| {
        outcome(
            connect(SocketAddr::new(a.ip(), port.wrapping_add(1))),
            |_| String::new(),
        )
    });
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let report = json!({
        "hosts": std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
        "resolved": resolved.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "forwarded": forwarded,
        // The forwarded port on the sandbox's own loopback address: nothing listens there.
        "loopback": outcome(connect(SocketAddr::from(([127, 0, 0, 1], port))), |_| String::new()),
        // A forwarded address at a port no rule forwards: Landlock refuses the connect.
        "other_port": other_port,
        // An address outside: the namespace has no route.
        "outside": outcome(connect(SocketAddr::from(([192, 0, 2, 1], port))), |_| String::new()),
        // A listening socket: Landlock refuses the bind.
        "bind": outcome(TcpListener::bind("127.0.0.1:0"), |_| String::new()),
        "seccomp": status.lines().find(|l| l.starts_with("Seccomp:")).unwrap_or(""),
    });
    println!("PROBE {report}");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
