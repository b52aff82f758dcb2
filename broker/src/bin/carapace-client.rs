//! `carapace-client`: the broker from a shell script inside a sandbox.
//!
//! Talks to the broker socket named by `CARAPACE_BROKER_FD` (default fd 3) through a session of
//! its own ([`Client::from_env`]), so that any number of carapace-client processes of one
//! sandbox can run at once (pipelines, `&`). See `--help` and docs/protocol.md.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{anyhow, Context, Result};
use carapace_broker::client::{Client, ClientError, DeliverArgs};
use carapace_broker::protocol::{Access, DeliverStatus, ErrorCode, SendStatus, MAX_FRAME};

const USAGE: &str = "\
usage: carapace-client ping
       carapace-client connect HOST PORT [-- PROG [ARGS...]]
       carapace-client secret NAME [--fd N -- PROG [ARGS...]]
       carapace-client open PATH [--read|--write|--create] [-- PROG [ARGS...]]
       carapace-client send CHANNEL RECIPIENT        (message body on stdin)
       carapace-client deliver CHANNEL SENDER [BODY]  (body on stdin when not given)
       carapace-client exec [--cwd DIR] -- PROG [ARGS...]   (DIR relative to the workspace)

Asks the carapace broker (socket fd $CARAPACE_BROKER_FD, default 3) for what the sandbox does not
have. Each request is checked against the policy of this sandbox's identity and audited.
Each run opens a private session on that socket, so several may run at once.

  ping      round trip to the broker; prints 'pong'.
  connect   a TCP connection to HOST:PORT. With PROG, the connected socket becomes PROG's stdin
            and stdout and PROG is executed; without, stdin/stdout are relayed to the socket.
  secret    the credential NAME. Without --fd it is printed to stdout (it then lives wherever
            stdout goes: prefer --fd). With --fd N, PROG runs with the sealed memfd as fd N.
  open      a file outside the sandbox's view (default --read). With PROG, the file becomes
            PROG's stdin (--read) or stdout (--write/--create); without, it is copied to stdout
            (--read) or stdin is copied into it.
  send      an outbound message on CHANNEL to RECIPIENT; prints 'delivered' or fails when the
            message was dead-lettered.
  deliver   (channel adapters) an inbound message SENDER wrote on CHANNEL, for the gateway;
            prints its sequence number. When the broker's inbound queue is full it fails
            ('busy'): keep the message and try again later.
  exec      a tool in a new confined child; its stdout/stderr are copied to ours and we exit
            with its exit code.

Exit status: 0 ok; 1 the broker refused or failed (reason on stderr); 2 usage; exec: the tool's
code, 125 refused (denied, rate limited, approval pending), 126 could not run; connect/secret/open
with PROG: 126/127 when PROG cannot be executed.";

/// Exit code for usage errors.
const EXIT_USAGE: u8 = 2;

enum Failure {
    Usage(String),
    Broker(anyhow::Error),
    Code(u8, anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Broker(e.into())
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(m)) => {
            eprintln!("carapace-client: {m}\n\n{USAGE}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Broker(e)) => {
            eprintln!("carapace-client: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Code(code, e)) => {
            eprintln!("carapace-client: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Split `args` at the first `--`: (before, Some(after)) or (args, None).
fn split_prog(args: &[String]) -> (&[String], Option<&[String]>) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], Some(&args[i + 1..])),
        None => (args, None),
    }
}

/// A session of our own on the inherited broker socket (which stays open for PROG).
fn client() -> Result<Client, Failure> {
    Client::from_env().map_err(|e| Failure::Broker(anyhow!(e).context("no broker")))
}

fn run(args: &[String]) -> Result<u8, Failure> {
    let Some(cmd) = args.first() else {
        return Err(usage("missing command"));
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(0)
        }
        "ping" => {
            if !rest.is_empty() {
                return Err(usage("ping takes no arguments"));
            }
            client()?.ping().context("ping")?;
            println!("pong");
            Ok(0)
        }
        "connect" => cmd_connect(rest),
        "secret" => cmd_secret(rest),
        "open" => cmd_open(rest),
        "send" => cmd_send(rest),
        "deliver" => cmd_deliver(rest),
        "exec" => cmd_exec(rest),
        other => Err(usage(format!("unknown command {other:?}"))),
    }
}

/// Replace this process with PROG (only returns on failure).
fn exec_prog(mut cmd: Command, prog: &str) -> Failure {
    let err = cmd.exec();
    let code = if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    Failure::Code(code, anyhow!(err).context(format!("cannot execute {prog}")))
}

fn prog_command(prog: &[String]) -> Result<(Command, &str), Failure> {
    let Some((p, args)) = prog.split_first() else {
        return Err(usage("missing PROG after --"));
    };
    let mut cmd = Command::new(p);
    cmd.args(args);
    Ok((cmd, p.as_str()))
}

fn cmd_connect(args: &[String]) -> Result<u8, Failure> {
    let (pos, prog) = split_prog(args);
    let [host, port] = pos else {
        return Err(usage("connect needs HOST PORT"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| usage(format!("bad port {port:?}")))?;
    let prog = prog.map(prog_command).transpose()?;
    let (sock, peer) = client()?
        .connect(host, port)
        .with_context(|| format!("connect {host}:{port}"))?;
    if let Some((mut cmd, name)) = prog {
        let dup = sock.try_clone().context("dup of the connected socket")?;
        cmd.stdin(Stdio::from(sock)).stdout(Stdio::from(dup));
        return Err(exec_prog(cmd, name));
    }
    let _ = peer;
    relay(TcpStream::from(sock))
}

/// Copy stdin to the socket (then half-close it) and the socket to stdout, until the socket's
/// read side ends.
fn relay(sock: TcpStream) -> Result<u8, Failure> {
    let mut up = sock.try_clone().context("dup of the connected socket")?;
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = sock;
    let mut out = io::stdout().lock();
    io::copy(&mut down, &mut out).context("relay from the socket")?;
    out.flush().context("stdout")?;
    Ok(0)
}

fn parse_fd(s: &str) -> Result<i32, Failure> {
    s.parse::<i32>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| usage(format!("bad fd number {s:?}")))
}

/// Make `fd` available as number `target` in PROG (not close-on-exec).
fn place_fd(fd: &OwnedFd, target: i32) -> Result<(), Failure> {
    if fd.as_raw_fd() == target {
        // Clears FD_CLOEXEC, the only descriptor flag.
        return rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
            .map_err(|e| Failure::Broker(anyhow!(io::Error::from(e)).context("fcntl(F_SETFD)")));
    }
    // SAFETY: dup2 of an fd we own onto `target`: whatever `target` was is closed by the kernel;
    // we are about to execve, and nothing in this process relies on `target` (if it was our
    // session or the inherited broker socket, neither is used again here).
    if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
        return Err(Failure::Broker(
            anyhow!(io::Error::last_os_error()).context(format!("dup2 onto fd {target}")),
        ));
    }
    Ok(())
}

fn cmd_secret(args: &[String]) -> Result<u8, Failure> {
    let (pos, prog) = split_prog(args);
    let (name, fd_target) = match pos {
        [name] => (name, None),
        [name, flag, n] if flag == "--fd" => (name, Some(parse_fd(n)?)),
        _ => return Err(usage("secret needs NAME [--fd N -- PROG ARGS]")),
    };
    match (fd_target, prog) {
        (Some(_), None) => return Err(usage("--fd N needs -- PROG")),
        (None, Some(_)) => return Err(usage("secret with PROG needs --fd N")),
        _ => {}
    }
    let prog = prog.map(prog_command).transpose()?;
    let (fd, len) = client()?
        .secret(name)
        .with_context(|| format!("secret {name}"))?;
    if let (Some((cmd, pname)), Some(target)) = (prog, fd_target) {
        // The memfd's offset is shared with whoever wrote it: start PROG at the beginning.
        rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)).map_err(|e| {
            Failure::Broker(anyhow!(io::Error::from(e)).context("lseek on the secret memfd"))
        })?;
        place_fd(&fd, target)?;
        return Err(exec_prog(cmd, pname));
    }
    // Read from offset 0 whatever the shared file offset is.
    let file = File::from(fd);
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 24)];
    let mut off = 0usize;
    while off < buf.len() {
        let n = file
            .read_at(&mut buf[off..], off as u64)
            .context("reading the secret memfd")?;
        if n == 0 {
            break;
        }
        off += n;
    }
    let mut out = io::stdout().lock();
    out.write_all(&buf[..off]).context("stdout")?;
    out.flush().context("stdout")?;
    Ok(0)
}

fn cmd_open(args: &[String]) -> Result<u8, Failure> {
    let (pos, prog) = split_prog(args);
    let mut path = None;
    let mut access = None;
    for a in pos {
        let acc = match a.as_str() {
            "--read" => Some(Access::Read),
            "--write" => Some(Access::Write),
            "--create" => Some(Access::Create),
            _ => None,
        };
        match (acc, &path, &access) {
            (Some(_), _, Some(_)) => return Err(usage("only one of --read/--write/--create")),
            (Some(x), _, None) => access = Some(x),
            (None, None, _) if !a.starts_with("--") => path = Some(a.clone()),
            (None, _, _) => return Err(usage(format!("unexpected argument {a:?}"))),
        }
    }
    let Some(path) = path else {
        return Err(usage("open needs PATH"));
    };
    let access = access.unwrap_or(Access::Read);
    let prog = prog.map(prog_command).transpose()?;
    let file = client()?
        .open(&path, access)
        .with_context(|| format!("open {path} ({})", access.as_str()))?;
    if let Some((mut cmd, name)) = prog {
        match access {
            Access::Read | Access::List => cmd.stdin(Stdio::from(file)),
            Access::Write | Access::Create => cmd.stdout(Stdio::from(file)),
        };
        return Err(exec_prog(cmd, name));
    }
    let mut file = file;
    match access {
        Access::Read | Access::List => {
            let mut out = io::stdout().lock();
            io::copy(&mut file, &mut out).context("copying the file to stdout")?;
            out.flush().context("stdout")?;
        }
        Access::Write | Access::Create => {
            io::copy(&mut io::stdin().lock(), &mut file).context("copying stdin to the file")?;
        }
    }
    Ok(0)
}

fn cmd_send(args: &[String]) -> Result<u8, Failure> {
    let [channel, recipient] = args else {
        return Err(usage("send needs CHANNEL RECIPIENT (body on stdin)"));
    };
    let body = body_from_stdin()?;
    let r = client()?
        .send_with(channel, recipient, &body, None, None)
        .with_context(|| format!("send on {channel} to {recipient}"))?;
    let dlq = r.dlq_id;
    match r.status {
        SendStatus::Delivered => {
            println!("delivered");
            Ok(0)
        }
        SendStatus::Queued => {
            match r.outbox_id {
                Some(id) => println!("queued {id}"),
                None => println!("queued"),
            }
            Ok(0)
        }
        SendStatus::Duplicate => {
            println!("duplicate");
            Ok(0)
        }
        SendStatus::DeadLettered => Err(Failure::Broker(anyhow!(
            "send on {channel} to {recipient}: message blocked, kept in the dead-letter queue{}",
            dlq.map(|id| format!(" as {id}")).unwrap_or_default()
        ))),
    }
}

/// A message body from stdin: at most [`MAX_FRAME`] bytes of UTF-8.
fn body_from_stdin() -> Result<String, Failure> {
    let mut body = Vec::new();
    io::stdin()
        .lock()
        .take(MAX_FRAME as u64 + 1)
        .read_to_end(&mut body)
        .context("reading the message from stdin")?;
    if body.len() > MAX_FRAME {
        return Err(Failure::Broker(anyhow!("message over {MAX_FRAME} bytes")));
    }
    String::from_utf8(body).map_err(|_| Failure::Broker(anyhow!("message is not UTF-8")))
}

fn cmd_deliver(args: &[String]) -> Result<u8, Failure> {
    let (channel, sender, body) = match args {
        [channel, sender] => (channel, sender, None),
        [channel, sender, body] => (channel, sender, Some(body.clone())),
        _ => {
            return Err(usage(
                "deliver needs CHANNEL SENDER [BODY] (body on stdin when not given)",
            ))
        }
    };
    let body = match body {
        Some(b) => b,
        None => body_from_stdin()?,
    };
    let r = client()?
        .deliver_message(&DeliverArgs {
            channel: channel.clone(),
            sender: sender.clone(),
            body,
            ..DeliverArgs::default()
        })
        .with_context(|| format!("deliver on {channel} from {sender}"))?;
    // Queued: the seq alone (what scripts read); otherwise what became of it.
    match r.status {
        DeliverStatus::Queued => println!("{}", r.seq),
        DeliverStatus::Held => println!("held {}", r.held.unwrap_or_default()),
        DeliverStatus::Duplicate => println!("duplicate"),
        DeliverStatus::Answered => println!("answered"),
    }
    Ok(0)
}

fn cmd_exec(args: &[String]) -> Result<u8, Failure> {
    let (pos, prog) = split_prog(args);
    let cwd = match pos {
        [] => None,
        [flag, dir] if flag == "--cwd" => Some(dir.clone()),
        _ => return Err(usage("exec takes [--cwd DIR] -- PROG ARGS")),
    };
    let Some(argv) = prog.filter(|p| !p.is_empty()) else {
        return Err(usage("exec needs -- PROG [ARGS]"));
    };
    let mut broker = client()?;
    let started = match broker.exec(argv.to_vec(), cwd) {
        Ok(s) => s,
        Err(e) => {
            let code = match e.code() {
                Some(ErrorCode::Denied | ErrorCode::RateLimited | ErrorCode::Pending) => 125,
                _ => 126,
            };
            return Err(Failure::Code(code, anyhow!(e).context("exec")));
        }
    };
    let out = copy_thread(started.stdout, false);
    let err = copy_thread(started.stderr, true);
    let _ = out.join();
    let _ = err.join();
    let summary = broker.wait_exit(started.id).map_err(|e: ClientError| {
        Failure::Code(126, anyhow!(e).context("exec: waiting for exit"))
    })?;
    Ok(u8::try_from(summary.exit.clamp(0, 255)).unwrap_or(255))
}

fn copy_thread(fd: OwnedFd, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut src = File::from(fd);
        let _ = if to_stderr {
            io::copy(&mut src, &mut io::stderr().lock())
        } else {
            let mut out = io::stdout().lock();
            let r = io::copy(&mut src, &mut out);
            let _ = out.flush();
            r
        };
    })
}
