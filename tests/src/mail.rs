//! Real mail servers on loopback for the e-mail channel's tests.
//!
//! - [`Dovecot`]: `/usr/sbin/dovecot -F` with a configuration of its own in a temporary
//!   directory (IMAP on 127.0.0.1 at a free port, one test user from a passwd-file, Maildir in
//!   the directory, nothing system-wide), optionally with TLS (implicit, or STARTTLS on the same
//!   port) from a certificate the test made. Runs as root (Dovecot switches to the mail user,
//!   `nobody`); stopped on drop. [`Dovecot::deliver`] drops a message into the Maildir.
//! - [`SmtpSink`]: `/usr/bin/python3 -m aiosmtpd`'s controller with a small handler: AUTH
//!   PLAIN/LOGIN against one user, every accepted message written as one JSON file
//!   (`mail_from`, `rcpt_tos`, `data`, `auth`); recipients starting with `reject4` / `reject5`
//!   are refused with 451 / 550. Stopped on drop.
//!
//! Both need packages (`.ci/test` installs them): dovecot-imapd, python3-aiosmtpd.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::free_port;

/// The test user of both servers.
pub const MAIL_USER: &str = "agent";
/// Its password.
pub const MAIL_PASSWORD: &str = "s3cret pass\"word";
/// The uid/gid Dovecot's mail processes run as (and the Maildir's owner).
const MAIL_UID: u32 = 65534;

/// TLS of the Dovecot listener.
#[derive(Debug, Clone)]
pub enum DovecotTls {
    None,
    /// `ssl = yes` (STARTTLS offered on the plain listener) and an implicit-TLS listener, with
    /// this certificate chain and key (PEM).
    Cert {
        cert_pem: String,
        key_pem: String,
    },
}

/// A running Dovecot.
#[derive(Debug)]
pub struct Dovecot {
    child: Child,
    dir: tempfile::TempDir,
    /// IMAP (plain, STARTTLS when TLS is configured) on 127.0.0.1.
    pub port: u16,
    /// Implicit TLS (IMAPS) on 127.0.0.1, when TLS is configured.
    pub tls_port: Option<u16>,
}

fn wait_port(port: u16, child: &mut Child, log: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "{what} exited ({st}) before listening:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} did not listen on 127.0.0.1:{port} within 20 s:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Dovecot {
    /// Start Dovecot without TLS.
    pub fn start() -> Result<Dovecot> {
        Dovecot::start_with(DovecotTls::None)
    }

    /// Start Dovecot without TLS and without IDLE in its capabilities (clients must poll).
    pub fn start_without_idle() -> Result<Dovecot> {
        Dovecot::start_inner(DovecotTls::None, false)
    }

    pub fn start_with(tls: DovecotTls) -> Result<Dovecot> {
        Dovecot::start_inner(tls, true)
    }

    fn start_inner(tls: DovecotTls, idle: bool) -> Result<Dovecot> {
        let dir = tempfile::Builder::new()
            .prefix("carapace-dovecot")
            .tempdir()
            .context("tempdir")?;
        let d = dir.path();
        // Dovecot's unprivileged processes must reach the Maildir through it.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        for sub in ["run", "state", "home", "mail"] {
            fs::create_dir(d.join(sub))?;
        }
        let maildir = d.join("mail").join(MAIL_USER);
        for sub in ["", "cur", "new", "tmp"] {
            let p = maildir.join(sub);
            fs::create_dir_all(&p)?;
            chown(&p, Some(MAIL_UID), Some(MAIL_UID))?;
        }
        chown(d.join("mail"), Some(MAIL_UID), Some(MAIL_UID))?;
        chown(d.join("home"), Some(MAIL_UID), Some(MAIL_UID))?;
        let passwd = d.join("passwd");
        fs::write(
            &passwd,
            format!(
                "{MAIL_USER}:{{PLAIN}}{MAIL_PASSWORD}:{MAIL_UID}:{MAIL_UID}::{}::\n",
                d.join("home").display()
            ),
        )?;
        let port = free_port();
        let (ssl, tls_port) = match &tls {
            DovecotTls::None => ("ssl = no\n".to_string(), None),
            DovecotTls::Cert { cert_pem, key_pem } => {
                fs::write(d.join("cert.pem"), cert_pem)?;
                fs::write(d.join("key.pem"), key_pem)?;
                fs::set_permissions(d.join("key.pem"), fs::Permissions::from_mode(0o600))?;
                let tls_port = free_port();
                (
                    format!(
                        "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n",
                        d.join("cert.pem").display(),
                        d.join("key.pem").display()
                    ),
                    Some(tls_port),
                )
            }
        };
        let log = d.join("dovecot.log");
        let conf = d.join("dovecot.conf");
        fs::write(
            &conf,
            format!(
                "base_dir = {run}\n\
                 state_dir = {state}\n\
                 log_path = {log}\n\
                 info_log_path = {log}\n\
                 debug_log_path = {log}\n\
                 protocols = imap\n\
                 listen = 127.0.0.1\n\
                 {ssl}\
                 disable_plaintext_auth = no\n\
                 auth_mechanisms = plain login\n\
                 passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {passwd}\n}}\n\
                 userdb {{\n  driver = passwd-file\n  args = username_format=%u {passwd}\n}}\n\
                 mail_location = maildir:{mail}/%u\n\
                 default_login_user = dovenull\n\
                 default_internal_user = dovecot\n\
                 service imap-login {{\n\
                 \x20 inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n\
                 {imaps}\
                 }}\n\
                 imap_idle_notify_interval = 2 mins\n\
                 {capability}",
                capability = if idle {
                    ""
                } else {
                    "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ UIDPLUS\n"
                },
                run = d.join("run").display(),
                state = d.join("state").display(),
                log = log.display(),
                passwd = passwd.display(),
                mail = d.join("mail").display(),
                imaps = match tls_port {
                    Some(p) => format!(
                        "  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {p}\n    \
                         ssl = yes\n  }}\n"
                    ),
                    None => String::new(),
                },
            ),
        )?;
        let mut child = Command::new("/usr/sbin/dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(d.join("dovecot.stderr")).context("stderr file")?,
            ))
            .spawn()
            .context("starting /usr/sbin/dovecot (apt-get install dovecot-imapd)")?;
        if let Err(e) = wait_port(port, &mut child, &log, "dovecot") {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = fs::read_to_string(d.join("dovecot.stderr")).unwrap_or_default();
            return Err(e.context(stderr));
        }
        if let Some(p) = tls_port {
            wait_port(p, &mut child, &log, "dovecot (imaps)")?;
        }
        Ok(Dovecot {
            child,
            dir,
            port,
            tls_port,
        })
    }

    /// The Maildir of the test user.
    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail").join(MAIL_USER)
    }

    /// Dovecot's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Drop `raw` into the INBOX (Maildir `new/`, written in `tmp/` and renamed, as an MDA
    /// does); returns the file name.
    pub fn deliver(&self, raw: &[u8]) -> Result<String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}.M{}P{}Q{}.carapace-test",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            N.fetch_add(1, Ordering::SeqCst),
            std::process::id(),
            N.load(Ordering::SeqCst)
        );
        let md = self.maildir();
        let tmp = md.join("tmp").join(&name);
        let mut f = fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(raw)?;
        f.sync_all()?;
        chown(&tmp, Some(MAIL_UID), Some(MAIL_UID))?;
        fs::rename(&tmp, md.join("new").join(&name))?;
        Ok(name)
    }

    /// Names of the messages Dovecot has seen and flagged `\Seen` (Maildir `cur/*:2,*S*`).
    pub fn seen_files(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.maildir().join("cur"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.rsplit_once(":2,")
                    .is_some_and(|(_, flags)| flags.contains('S'))
            })
            .collect();
        out.sort();
        out
    }

    /// Forget every UID: remove Dovecot's index and UID list, so that the next SELECT sees a
    /// new UIDVALIDITY (the folder "was recreated"). Dovecot takes the new value from the
    /// clock, so this first lets a second pass.
    pub fn reset_uids(&self) -> Result<()> {
        std::thread::sleep(Duration::from_millis(1100));
        for e in fs::read_dir(self.maildir())?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("dovecot") {
                let p = e.path();
                if p.is_dir() {
                    fs::remove_dir_all(&p)?;
                } else {
                    fs::remove_file(&p)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its children; SIGKILL after a grace period.
        // SAFETY: the pid is our own child's, not yet waited for.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SMTP_SINK_PY: &str = r#"
import json, os, sys, threading, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

out_dir, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
counter = [0]
lock = threading.Lock()

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login.decode() == user
          and auth_data.password.decode() == password)
    return AuthResult(success=ok, handled=False)

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject4"):
            return "451 4.3.0 try again later"
        if address.startswith("reject5"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with lock:
            counter[0] += 1
            n = counter[0]
        name = "%06d.json" % n
        rec = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "auth": session.authenticated,
            "data": envelope.original_content.decode("utf-8", "replace"),
        }
        tmp = os.path.join(out_dir, "." + name)
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.rename(tmp, os.path.join(out_dir, name))
        return "250 OK queued"

kw = {}
if len(sys.argv) > 6:
    import ssl
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(sys.argv[5], sys.argv[6])
    kw = dict(tls_context=tls, require_starttls=True)
c = Controller(Handler(), hostname="127.0.0.1", port=port, authenticator=authenticator,
               auth_required=True, auth_require_tls=False, **kw)
c.start()
print("READY", flush=True)
sys.stdin.read()
c.stop()
"#;

/// A running aiosmtpd that keeps what it receives.
#[derive(Debug)]
pub struct SmtpSink {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// Whether the client authenticated.
    pub auth: bool,
    /// The message as received (headers and body).
    pub data: String,
}

impl SmtpSink {
    /// Start the sink without TLS.
    pub fn start() -> Result<SmtpSink> {
        SmtpSink::start_inner(None)
    }

    /// Start the sink with STARTTLS required, from this certificate chain and key (PEM).
    pub fn start_starttls(cert_pem: &str, key_pem: &str) -> Result<SmtpSink> {
        SmtpSink::start_inner(Some((cert_pem, key_pem)))
    }

    fn start_inner(tls: Option<(&str, &str)>) -> Result<SmtpSink> {
        let dir = tempfile::Builder::new()
            .prefix("carapace-smtp")
            .tempdir()
            .context("tempdir")?;
        let script = dir.path().join("sink.py");
        fs::write(&script, SMTP_SINK_PY)?;
        let out = dir.path().join("received");
        fs::create_dir(&out)?;
        let port = free_port();
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(&script)
            .arg(&out)
            .arg(port.to_string())
            .arg(MAIL_USER)
            .arg(MAIL_PASSWORD);
        if let Some((cert, key)) = tls {
            let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            fs::write(&c, cert)?;
            fs::write(&k, key)?;
            cmd.arg(&c).arg(&k);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                fs::File::create(dir.path().join("stderr")).context("stderr file")?,
            ))
            .spawn()
            .context("starting /usr/bin/python3 (apt-get install python3-aiosmtpd)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "READY" {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "aiosmtpd did not start:\n{}",
                fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        let log = dir.path().join("stderr");
        wait_port(port, &mut child, &log, "aiosmtpd")?;
        Ok(SmtpSink { child, dir, port })
    }

    /// Every message accepted so far, in order.
    pub fn received(&self) -> Vec<Received> {
        let out = self.dir.path().join("received");
        let mut names: Vec<PathBuf> = fs::read_dir(&out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .filter_map(|p| fs::read(p).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| Received {
                mail_from: v["mail_from"].as_str().unwrap_or_default().to_string(),
                rcpt_tos: v["rcpt_tos"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                auth: v["auth"].as_bool().unwrap_or(false),
                data: v["data"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    /// Wait until at least `n` messages arrived (at most `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.received();
            if r.len() >= n || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
