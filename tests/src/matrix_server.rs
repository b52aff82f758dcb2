//! A real Matrix homeserver for the Matrix adapter's tests: Synapse from PyPI (installed by
//! `.ci/test` into [`SYNAPSE_VENV`]), started on a loopback port with a generated
//! `homeserver.yaml` (sqlite, open registration without verification, rate limits relaxed
//! unless the test asks for [`Limits::Strict`]), a client for the test's own users, and
//! [`Proxy`], a loopback TCP proxy in front of it that can cut connections, lose answers and
//! answer with malformed frames on command.
//!
//! Synapse is started from a thread that lives as long as the test process, with
//! `PR_SET_PDEATHSIG`, so it dies with the test binary even when a shared instance is never
//! dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::service::{free_port, http_with};

/// The virtual environment `.ci/test` installs `matrix-synapse` into.
pub const SYNAPSE_VENV: &str = "/var/cache/carapace-synapse-venv";
/// The homeserver's name (user ids are `@NAME:localhost`).
pub const SERVER_NAME: &str = "localhost";

/// How strict the homeserver's rate limits are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// Relaxed everywhere: no test meets a 429 by accident.
    Relaxed,
    /// Sending messages (`rc_message`): a burst of 2, then one per 5 s, so a third message
    /// in a row gets a real `429 M_LIMIT_EXCEEDED` with `retry_after_ms`.
    Strict,
}

/// A running Synapse.
#[derive(Debug)]
pub struct Synapse {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn homeserver_yaml(dir: &Path, port: u16, limits: Limits) -> String {
    let d = dir.display();
    let message = match limits {
        Limits::Relaxed => "{per_second: 1000, burst_count: 1000}",
        Limits::Strict => "{per_second: 0.2, burst_count: 2}",
    };
    let relaxed = "{per_second: 1000, burst_count: 1000}";
    format!(
        r#"server_name: "{SERVER_NAME}"
pid_file: "{d}/homeserver.pid"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{d}/homeserver.db"
media_store_path: "{d}/media"
signing_key_path: "{d}/signing.key"
report_stats: false
enable_registration: true
enable_registration_without_verification: true
trusted_key_servers: []
suppress_key_server_warning: true
macaroon_secret_key: "test-macaroon-secret-{port}"
form_secret: "test-form-secret-{port}"
presence:
  enabled: false
url_preview_enabled: false
rc_message: {message}
rc_registration: {relaxed}
rc_room_creation: {relaxed}
rc_login:
  address: {relaxed}
  account: {relaxed}
  failed_attempts: {relaxed}
rc_joins:
  local: {relaxed}
  remote: {relaxed}
rc_joins_per_room: {relaxed}
rc_invites:
  per_room: {relaxed}
  per_user: {relaxed}
  per_issuer: {relaxed}
"#
    )
}

/// An ed25519 signing key file's line (Synapse's format: `ed25519 VERSION UNPADDED-BASE64`).
fn signing_key() -> String {
    use base64::Engine as _;
    let mut seed = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    format!(
        "ed25519 a_test {}\n",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed)
    )
}

/// A command to spawn, and where its child goes.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawn on a thread that never ends, so `PR_SET_PDEATHSIG` (tied to the spawning thread) only
/// fires when the test process goes.
fn spawn_for_life(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);
    let tx = {
        let mut g = lock(&SPAWNER);
        g.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::spawn(move || {
                for (mut c, reply) in rx {
                    let _ = reply.send(c.spawn());
                }
                // Park forever: the children's death signal is tied to this thread.
                loop {
                    std::thread::park();
                }
            });
            tx
        })
        .clone()
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (rtx, rrx) = mpsc::channel();
    tx.send((cmd, rtx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    rrx.recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

impl Synapse {
    /// Start a homeserver and wait until its client API answers (fails, never skips, when
    /// Synapse is not installed: `.ci/test` installs it).
    pub fn start(limits: Limits) -> Result<Synapse> {
        let python = Path::new(SYNAPSE_VENV).join("bin/python");
        if !python.exists() {
            bail!(
                "{} is missing: install Synapse with `.ci/test` (python3 -m venv {SYNAPSE_VENV} && {SYNAPSE_VENV}/bin/pip install matrix-synapse)",
                python.display()
            );
        }
        let dir = crate::var_tmpdir("carapace-synapse-");
        let port = free_port();
        std::fs::create_dir_all(dir.path().join("media"))?;
        std::fs::write(dir.path().join("signing.key"), signing_key())?;
        let config = dir.path().join("homeserver.yaml");
        std::fs::write(&config, homeserver_yaml(dir.path(), port, limits))?;
        let log = std::fs::File::create(dir.path().join("synapse.log"))?;
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_for_life(cmd).context("starting Synapse")?;
        let s = Synapse {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            child: Mutex::new(Some(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if http_with(s.addr, "GET", "/_matrix/client/versions", &[], None).status == 200 {
                return Ok(s);
            }
            if let Some(c) = lock(&s.child).as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("Synapse exited ({st}) while starting:\n{}", s.log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!("Synapse did not answer within 90 s:\n{}", s.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The end of Synapse's log.
    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.path().join("synapse.log")).unwrap_or_default();
        let start = t.len().saturating_sub(4000);
        t.get(start..).unwrap_or("").to_string()
    }

    /// Register user `name` (open registration, the dummy auth stage); a client for it.
    pub fn register(&self, name: &str) -> Result<User> {
        let body = json!({"username": name, "password": format!("pw-{name}-0123456789"),
                          "auth": {"type": "m.login.dummy"}, "inhibit_login": false});
        let v = request(
            self.addr,
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(&body),
        )?;
        let token = v["access_token"]
            .as_str()
            .context("register: no access_token")?
            .to_string();
        let user_id = v["user_id"]
            .as_str()
            .context("register: no user_id")?
            .to_string();
        Ok(User {
            addr: self.addr,
            user_id,
            token,
        })
    }
}

/// The homeserver with relaxed limits that a test binary's tests share: started on first use,
/// stopped and its directory removed when the process exits (a static is never dropped).
pub fn shared() -> &'static Synapse {
    static HS: std::sync::OnceLock<Synapse> = std::sync::OnceLock::new();
    extern "C" fn stop_shared() {
        if let Some(hs) = HS.get() {
            if let Some(mut c) = lock(&hs.child).take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(hs.dir.path());
        }
    }
    HS.get_or_init(|| {
        let t = Instant::now();
        let hs = Synapse::start(Limits::Relaxed).unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("synapse up in {} ms", t.elapsed().as_millis());
        // SAFETY: `stop_shared` is a plain extern "C" function that stays valid for the
        // process's life; atexit only records it.
        unsafe { libc::atexit(stop_shared) };
        hs
    })
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One client-server API request, retried while the server answers 429 (after the
/// `retry_after_ms` it gives); the answer's JSON, or an error with the status and body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Value> {
    let body = body.map(Value::to_string);
    let auth = token.map(|t| format!("Bearer {t}"));
    for _ in 0..30 {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = http_with(addr, method, path, &headers, body.as_deref());
        let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        match r.status {
            200..=299 => return Ok(v),
            429 => {
                let ms = v["retry_after_ms"].as_u64().unwrap_or(1000);
                std::thread::sleep(Duration::from_millis(ms + 50));
            }
            s => bail!("{method} {path}: {s}: {}", r.body),
        }
    }
    bail!("{method} {path}: still rate-limited after 30 tries")
}

/// `s` percent-encoded for a path segment.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A registered user, speaking the client-server API from the test.
#[derive(Debug, Clone)]
pub struct User {
    addr: SocketAddr,
    pub user_id: String,
    pub token: String,
}

impl User {
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        request(
            self.addr,
            method,
            &format!("/_matrix/client/v3{path}"),
            Some(&self.token),
            body,
        )
    }

    /// Create a private room; its id.
    pub fn create_room(&self) -> Result<String> {
        let v = self.call(
            "POST",
            "/createRoom",
            Some(&json!({"preset": "private_chat"})),
        )?;
        Ok(v["room_id"].as_str().context("no room_id")?.to_string())
    }

    pub fn invite(&self, room: &str, user_id: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/rooms/{}/invite", enc(room)),
            Some(&json!({"user_id": user_id})),
        )
        .map(drop)
    }

    pub fn join(&self, room: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/rooms/{}/join", enc(room)),
            Some(&json!({})),
        )
        .map(drop)
    }

    /// Send a text message (a fresh transaction id); its event id.
    pub fn say(&self, room: &str, text: &str) -> Result<String> {
        let txn = crate::unique("t");
        let v = self.call(
            "PUT",
            &format!("/rooms/{}/send/m.room.message/{}", enc(room), enc(&txn)),
            Some(&json!({"msgtype": "m.text", "body": text})),
        )?;
        Ok(v["event_id"].as_str().context("no event_id")?.to_string())
    }

    /// `user_id`'s membership in `room` (`join`, `invite`, ...), None when it has none.
    pub fn membership(&self, room: &str, user_id: &str) -> Option<String> {
        let v = self
            .call(
                "GET",
                &format!("/rooms/{}/state/m.room.member/{}", enc(room), enc(user_id)),
                None,
            )
            .ok()?;
        v["membership"].as_str().map(str::to_string)
    }

    /// The `m.room.message` events of `room` (oldest first): (sender, body).
    pub fn messages(&self, room: &str) -> Result<Vec<(String, String)>> {
        let v = self.call(
            "GET",
            &format!("/rooms/{}/messages?dir=b&limit=1000", enc(room)),
            None,
        )?;
        let mut out: Vec<(String, String)> = v["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| {
                (
                    e["sender"].as_str().unwrap_or("").to_string(),
                    e["content"]["body"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.reverse();
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------------
// The proxy

/// What the proxy does to the next matching requests.
#[derive(Debug, Default)]
struct ProxyState {
    /// Answer this many requests whose path contains the pattern with this body (200), without
    /// asking the server.
    malformed: Option<(String, usize, String)>,
    /// Forward this many requests whose path contains the pattern, let the server answer, and
    /// cut the connection instead of passing the answer on.
    lose_answer: Option<(String, usize)>,
    /// Request lines seen, in order, with when.
    seen: Vec<(Instant, String)>,
    /// The live connections (client side), for [`Proxy::cut_all`].
    live: Vec<TcpStream>,
}

/// A loopback TCP proxy in front of a homeserver.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    /// A proxy to `upstream` on a free loopback port.
    pub fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || Proxy::serve(client, upstream, &st));
            }
        });
        Ok(Proxy { addr, state })
    }

    fn serve(mut client: TcpStream, upstream: SocketAddr, st: &Mutex<ProxyState>) {
        let Some(head) = read_head(&mut client) else {
            return;
        };
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let (malformed, lose) = {
            let mut g = lock(st);
            g.seen.push((Instant::now(), line.clone()));
            if let Ok(c) = client.try_clone() {
                g.live.push(c);
            }
            let malformed = match &mut g.malformed {
                Some((pat, n, body)) if *n > 0 && line.contains(pat.as_str()) => {
                    *n -= 1;
                    Some(body.clone())
                }
                _ => None,
            };
            let lose = match &mut g.lose_answer {
                Some((pat, n)) if malformed.is_none() && *n > 0 && line.contains(pat.as_str()) => {
                    *n -= 1;
                    true
                }
                _ => false,
            };
            (malformed, lose)
        };
        if let Some(body) = malformed {
            let _ = write!(
                client,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        let Ok(mut server) = TcpStream::connect(upstream) else {
            return;
        };
        if server.write_all(&head).is_err() {
            return;
        }
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        let up = std::thread::spawn(move || pump(c2, s2));
        if lose {
            // Let the server finish its answer, then drop it and the client's connection.
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink);
            let _ = client.shutdown(Shutdown::Both);
        } else {
            pump(server, client);
        }
        let _ = up.join();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer the next `n` requests whose request line contains `pattern` with `body` (200).
    pub fn malformed(&self, pattern: &str, n: usize, body: &str) {
        lock(&self.state).malformed = Some((pattern.into(), n, body.into()));
    }

    /// Lose the server's answer to the next `n` requests whose request line contains
    /// `pattern` (the server did the work; the client sees a dropped connection).
    pub fn lose_answers(&self, pattern: &str, n: usize) {
        lock(&self.state).lose_answer = Some((pattern.into(), n));
    }

    /// Cut every connection open now (a long poll in flight included).
    pub fn cut_all(&self) {
        for c in lock(&self.state).live.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// The request lines seen so far.
    pub fn seen(&self) -> Vec<String> {
        lock(&self.state)
            .seen
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The request lines seen so far, with when they came.
    pub fn seen_timed(&self) -> Vec<(Instant, String)> {
        lock(&self.state).seen.clone()
    }

    /// How many malformed answers and lost answers are still to come.
    pub fn pending(&self) -> (usize, usize) {
        let g = lock(&self.state);
        (
            g.malformed.as_ref().map_or(0, |m| m.1),
            g.lose_answer.as_ref().map_or(0, |l| l.1),
        )
    }
}
