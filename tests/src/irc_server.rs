//! A real IRC server for the IRC adapter's end-to-end tests: Debian's `ngircd`, started
//! unprivileged (it drops to nobody) on a free loopback port with a configuration the test
//! writes, the channel `#test` predefined; and [`IrcClient`], a plain-socket IRC user (the
//! admitted person and the stranger of the tests). Fails, never skips, when ngircd is missing
//! (`.ci/test` installs it).

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The channel the server creates.
pub const CHANNEL: &str = "#test";

/// An IRC operator the server knows (`OPER`), who may `KILL` a client: how the tests cut the
/// adapter's connection on the server's side.
pub const OPER: &str = "testoper";
pub const OPER_PASSWORD: &str = "oper-password";

/// A running ngircd; killed when dropped.
#[derive(Debug)]
pub struct Ngircd {
    child: Child,
    port: u16,
    /// The TLS port, when started with a certificate.
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("a free port: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("its address: {e}"))
        .port()
}

impl Ngircd {
    /// Start ngircd and wait until it accepts connections.
    pub fn start() -> Ngircd {
        Ngircd::start_with(None)
    }

    /// Start ngircd with a TLS port too, serving `cert_pem` with `key_pem`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Ngircd {
        Ngircd::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Ngircd {
        let dir = crate::var_tmpdir("carapace-ngircd-");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("chmod the ngircd directory: {e}"));
        let port = free_port();
        let conf = dir.path().join("ngircd.conf");
        let mut ssl = String::new();
        let mut tls_port = None;
        if let Some((cert, key)) = tls {
            let p = free_port();
            let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&c, cert).unwrap_or_else(|e| panic!("write the certificate: {e}"));
            std::fs::write(&k, key).unwrap_or_else(|e| panic!("write the key: {e}"));
            ssl = format!(
                "[SSL]\nCertFile = {}\nKeyFile = {}\nPorts = {p}\n",
                c.display(),
                k.display()
            );
            tls_port = Some(p);
        }
        std::fs::write(
            &conf,
            format!(
                "[Global]\nName = irc.carapace.test\nInfo = carapace test server\n\
                 AdminInfo1 = test\nAdminInfo2 = test\nAdminEMail = test@localhost\n\
                 Listen = 127.0.0.1\nPorts = {port}\nMotdPhrase = \"carapace test\"\n\
                 ServerUID = 65534\nServerGID = 65534\nPidFile = {pid}\n\
                 [Limits]\nPingTimeout = 120\nPongTimeout = 20\nMaxConnectionsIP = 0\n\
                 [Options]\nPAM = no\nIdent = no\nDNS = no\n\
                 [Operator]\nName = {OPER}\nPassword = {OPER_PASSWORD}\n\
                 [Channel]\nName = {CHANNEL}\nModes = tn\n{ssl}",
                pid = dir.path().join("ngircd.pid").display(),
            ),
        )
        .unwrap_or_else(|e| panic!("write the ngircd configuration: {e}"));
        let log = std::fs::File::create(dir.path().join("ngircd.log"))
            .unwrap_or_else(|e| panic!("the ngircd log: {e}"));
        let child = Command::new("ngircd")
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("the log: {e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start ngircd (apt-get install ngircd; .ci/test installs it): {e}")
            });
        let s = Ngircd {
            child,
            port,
            tls_port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || tls_port.is_some_and(|p| TcpStream::connect(("127.0.0.1", p)).is_err())
        {
            assert!(
                Instant::now() < deadline,
                "ngircd did not listen: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What ngircd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ngircd.log")).unwrap_or_default()
    }
}

impl Drop for Ngircd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line a client received, parsed just enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The sender's nick (or server name).
    pub from: String,
    pub command: String,
    pub target: String,
    pub text: String,
}

/// A person on the server: registered, PINGs answered, what arrives recorded.
#[derive(Debug)]
pub struct IrcClient {
    stream: TcpStream,
    got: Arc<Mutex<Vec<Received>>>,
    pub nick: String,
}

impl IrcClient {
    /// Connect as `nick` and wait for the welcome.
    pub fn connect(port: u16, nick: &str) -> IrcClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to the IRC server: {e}"));
        let got = Arc::new(Mutex::new(Vec::<Received>::new()));
        let reader = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("clone the socket: {e}"));
        let mut writer = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("clone the socket: {e}"));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if let Some(t) = line.strip_prefix("PING ") {
                    let _ = writer.write_all(format!("PONG {t}\r\n").as_bytes());
                    continue;
                }
                let (head, text) = line.split_once(" :").unwrap_or((line, ""));
                let mut words = head.split(' ');
                let from = words
                    .next()
                    .unwrap_or("")
                    .trim_start_matches(':')
                    .split('!')
                    .next()
                    .unwrap_or("")
                    .to_string();
                let command = words.next().unwrap_or("").to_string();
                let target = words.next().unwrap_or("").to_string();
                g.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Received {
                        from,
                        command,
                        target,
                        text: text.to_string(),
                    });
            }
        });
        let c = IrcClient {
            stream,
            got,
            nick: nick.to_string(),
        };
        c.send(&format!("NICK {nick}"));
        c.send(&format!("USER {nick} 0 * :{nick}"));
        c.wait(Duration::from_secs(10), "the welcome", |r| {
            r.command == "001"
        });
        c
    }

    /// Send one raw line.
    pub fn send(&self, line: &str) {
        (&self.stream)
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("write to the IRC server: {e}"));
    }

    /// Join `channel` and wait until the server says so.
    pub fn join(&self, channel: &str) {
        self.send(&format!("JOIN {channel}"));
        let nick = self.nick.clone();
        self.wait(Duration::from_secs(10), "the JOIN", move |r| {
            r.command == "JOIN" && r.from == nick
        });
    }

    /// Become an IRC operator and disconnect `nick` from the server (`KILL`).
    pub fn kill(&self, nick: &str) {
        self.send(&format!("OPER {OPER} {OPER_PASSWORD}"));
        self.wait(Duration::from_secs(10), "the operator status", |r| {
            r.command == "381"
        });
        self.send(&format!("KILL {nick} :a test of reconnection"));
    }

    pub fn privmsg(&self, target: &str, text: &str) {
        self.send(&format!("PRIVMSG {target} :{text}"));
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.got
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The PRIVMSGs `from` sent to `target`, their texts.
    pub fn messages(&self, from: &str, target: &str) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(|r| r.command == "PRIVMSG" && r.from == from && r.target == target)
            .map(|r| r.text)
            .collect()
    }

    /// Wait until a received line matches `f` (panics after `limit`, saying `what`).
    pub fn wait(&self, limit: Duration, what: &str, f: impl Fn(&Received) -> bool) {
        let deadline = Instant::now() + limit;
        while !self.received().iter().any(&f) {
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}",
                self.nick
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for IrcClient {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
