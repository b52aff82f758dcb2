//! A fake IRC server for the IRC adapter's tests, wire-exact for the IRCv3 capability
//! negotiation and SASL PLAIN exchange (which ngircd, the real server the end-to-end tests use,
//! does not offer), and for what the adapter sends after it: `NICK`/`USER` up to `001`, `JOIN`
//! (echoed with the client's full prefix), `PING`/`PONG`, `PRIVMSG` (recorded), `QUIT`.
//!
//! - `CAP LS 302` is answered with [`FakeIrcOpts::caps`]; `CAP REQ` is ACKed when every asked
//!   capability is offered, NAKed otherwise; registration waits for `CAP END` once `CAP` was
//!   said.
//! - `AUTHENTICATE PLAIN` → `AUTHENTICATE +`; the base64 response (400-byte chunks, `+` after an
//!   exact 400) is checked against [`FakeIrcOpts::sasl`]: `900` + `903`, or `904`.
//! - [`FakeIrc::inject`] writes a raw line to the connected client (malformed ones too);
//!   [`FakeIrc::privmsg`] one message from a user; [`FakeIrc::drop_client`] cuts the
//!   connection; [`FakeIrc::throttle`] answers the next N `PRIVMSG`s with `263` (try again)
//!   instead of taking them.
//!
//! Every line the client sent is recorded ([`FakeIrc::lines`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// The server's name in prefixes.
pub const SERVER: &str = "irc.fake.test";
/// The host the fake shows for every client.
pub const HOST: &str = "fake.host";

/// What the fake offers.
#[derive(Debug, Clone)]
pub struct FakeIrcOpts {
    /// The capabilities `CAP LS` lists.
    pub caps: Vec<String>,
    /// The SASL PLAIN account and password accepted.
    pub sasl: Option<(String, String)>,
}

impl Default for FakeIrcOpts {
    fn default() -> FakeIrcOpts {
        FakeIrcOpts {
            caps: ["sasl=PLAIN", "message-tags", "server-time", "account-tag"]
                .map(String::from)
                .to_vec(),
            sasl: None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<String>,
    sent: Vec<(String, String)>,
    client: Option<TcpStream>,
    connections: usize,
    registered: usize,
    sasl_results: Vec<bool>,
    throttle: u32,
    throttle_skip: u32,
    nick: String,
}

/// The fake server; stops accepting when dropped.
#[derive(Debug)]
pub struct FakeIrc {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeIrc {
    /// Listen on a loopback port and serve one client at a time.
    pub fn start(opts: FakeIrcOpts) -> FakeIrc {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind the fake IRC server: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("its address: {e}"));
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (st, opts) = (st.clone(), opts.clone());
                std::thread::spawn(move || serve(conn, &st, &opts));
            }
        });
        FakeIrc { addr, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every line clients sent, in order.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.state).lines.clone()
    }

    /// The `PRIVMSG`s taken: (target, text).
    pub fn sent(&self) -> Vec<(String, String)> {
        lock(&self.state).sent.clone()
    }

    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// Registrations completed (`001` sent).
    pub fn registered(&self) -> usize {
        lock(&self.state).registered
    }

    /// The outcome of each SASL exchange.
    pub fn sasl_results(&self) -> Vec<bool> {
        lock(&self.state).sasl_results.clone()
    }

    /// Answer the next `n` `PRIVMSG`s with `263` instead of taking them.
    pub fn throttle(&self, n: u32) {
        self.throttle_after(0, n);
    }

    /// Take the next `skip` `PRIVMSG`s, then answer `n` with `263`.
    pub fn throttle_after(&self, skip: u32, n: u32) {
        let mut st = lock(&self.state);
        st.throttle_skip = skip;
        st.throttle = n;
    }

    /// Write `line` (CR LF added) to the connected client.
    pub fn inject(&self, line: &str) {
        let mut st = lock(&self.state);
        if let Some(c) = st.client.as_mut() {
            let _ = c.write_all(format!("{line}\r\n").as_bytes());
        }
    }

    /// A `PRIVMSG` from `nick` to `target`, with IRCv3 `tags` (without `@`; "" for none).
    pub fn privmsg(&self, tags: &str, nick: &str, target: &str, text: &str) {
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!("@{tags} ")
        };
        self.inject(&format!(
            "{tags}:{nick}!{nick}@{HOST} PRIVMSG {target} :{text}"
        ));
    }

    /// Cut the client's connection.
    pub fn drop_client(&self) {
        if let Some(c) = lock(&self.state).client.take() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Wait until `f` holds (panics after `limit`, saying `what`).
    pub fn wait(&self, limit: Duration, what: &str, f: impl Fn(&FakeIrc) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One client, until it goes.
fn serve(conn: TcpStream, st: &Mutex<State>, opts: &FakeIrcOpts) {
    let Ok(mut w) = conn.try_clone() else { return };
    {
        let mut s = lock(st);
        s.connections += 1;
        if let Ok(c) = conn.try_clone() {
            s.client = Some(c);
        }
    }
    let mut reader = BufReader::new(conn);
    let (mut nick, mut user, mut cap_open, mut registered) = (None::<String>, false, false, false);
    let mut sasl_buf = String::new();
    let out = |w: &mut TcpStream, line: String| {
        let _ = w.write_all(format!("{line}\r\n").as_bytes());
    };
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        lock(st).lines.push(line.clone());
        let (head, trailing) = match line.split_once(" :") {
            Some((h, t)) => (h, Some(t)),
            None => (line.as_str(), None),
        };
        let mut words: Vec<&str> = head.split(' ').filter(|w| !w.is_empty()).collect();
        if let Some(t) = trailing {
            words.push(t);
        }
        let cmd = words.first().copied().unwrap_or("").to_ascii_uppercase();
        let arg = |i: usize| words.get(i).copied().unwrap_or("");
        let me = nick.clone().unwrap_or_else(|| "*".into());
        match cmd.as_str() {
            "CAP" => match arg(1).to_ascii_uppercase().as_str() {
                "LS" => {
                    cap_open = true;
                    out(
                        &mut w,
                        format!(":{SERVER} CAP {me} LS :{}", opts.caps.join(" ")),
                    );
                }
                "REQ" => {
                    let offered: Vec<&str> = opts
                        .caps
                        .iter()
                        .map(|c| c.split('=').next().unwrap_or(c))
                        .collect();
                    let asked = arg(2);
                    let verb = if asked.split(' ').all(|c| offered.contains(&c)) {
                        "ACK"
                    } else {
                        "NAK"
                    };
                    out(&mut w, format!(":{SERVER} CAP {me} {verb} :{asked}"));
                }
                "END" => cap_open = false,
                _ => {}
            },
            "AUTHENTICATE" if arg(1) == "PLAIN" => out(&mut w, "AUTHENTICATE +".into()),
            "AUTHENTICATE" => {
                if arg(1) != "+" {
                    sasl_buf.push_str(arg(1));
                }
                if arg(1).len() == 400 {
                    continue;
                }
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(std::mem::take(&mut sasl_buf))
                    .unwrap_or_default();
                let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
                let ok = match (&opts.sasl, parts.as_slice()) {
                    (Some((u, p)), [_authz, authc, pw]) => {
                        *authc == u.as_bytes() && *pw == p.as_bytes()
                    }
                    _ => false,
                };
                lock(st).sasl_results.push(ok);
                if ok {
                    out(
                        &mut w,
                        format!(":{SERVER} 900 {me} {me}!{me}@{HOST} {me} :You are now logged in"),
                    );
                    out(
                        &mut w,
                        format!(":{SERVER} 903 {me} :SASL authentication successful"),
                    );
                } else {
                    out(
                        &mut w,
                        format!(":{SERVER} 904 {me} :SASL authentication failed"),
                    );
                }
            }
            "NICK" => nick = Some(arg(1).to_string()),
            "USER" => user = true,
            "PING" => out(&mut w, format!(":{SERVER} PONG {SERVER} :{}", arg(1))),
            "JOIN" => out(&mut w, format!(":{me}!{me}@{HOST} JOIN {}", arg(1))),
            "PRIVMSG" => {
                let mut s = lock(st);
                if s.throttle_skip > 0 {
                    s.throttle_skip -= 1;
                    s.sent.push((arg(1).to_string(), arg(2).to_string()));
                } else if s.throttle > 0 {
                    s.throttle -= 1;
                    drop(s);
                    out(&mut w, format!(":{SERVER} 263 {me} PRIVMSG :Server load is temporarily too heavy. Please wait a while and try again."));
                } else {
                    s.sent.push((arg(1).to_string(), arg(2).to_string()));
                }
            }
            "QUIT" => return,
            _ => {}
        }
        if !registered && !cap_open && user {
            if let Some(n) = &nick {
                registered = true;
                let mut s = lock(st);
                s.registered += 1;
                s.nick = n.clone();
                drop(s);
                out(
                    &mut w,
                    format!(":{SERVER} 001 {n} :Welcome to the fake network {n}!{n}@{HOST}"),
                );
                out(&mut w, format!(":{SERVER} 376 {n} :End of MOTD"));
            }
        }
    }
}
