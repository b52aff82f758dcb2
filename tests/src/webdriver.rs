//! A small synchronous WebDriver client (W3C WebDriver over plain HTTP JSON) for headless
//! Chromium driven by `chromedriver`, both from Debian's `chromium` and `chromium-driver`.
//!
//! [`Browser::start`] runs `chromedriver` on a free loopback port and opens one session;
//! dropping the [`Browser`] ends the session and stops `chromedriver` (which stops Chromium).
//! Only what the console's test needs: navigate, find, click, type, read text, run a script,
//! resize the window, take a PNG screenshot.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use serde_json::{json, Value};

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromedriver` and one headless Chromium session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    log: PathBuf,
}

/// An element of the page (its WebDriver reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

impl Browser {
    /// Start `chromedriver` (its log in `log_dir`) and a headless Chromium session with a
    /// `width`x`height` window.
    pub fn start(log_dir: &Path, width: u32, height: u32) -> Result<Browser> {
        let port = crate::service::free_port();
        let log = log_dir.join("chromedriver.log");
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting /usr/bin/chromedriver (Debian package chromium-driver)")?;
        let mut b = Browser {
            driver,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            session: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = b.request("GET", "/status", None) {
                if v["value"]["ready"] == true {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver not ready within 20 s; log: {}", b.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    // Chromium refuses to start as root with its sandbox on ("Running as root
                    // without --no-sandbox is not supported"), and the tests run as root.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--metrics-recording-only",
                    format!("--window-size={width},{height}"),
                ],
            },
        }}});
        let v = b.request("POST", "/session", Some(&caps))?;
        b.session = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {v}; log: {}", b.log_text()))?
            .to_string();
        Ok(b)
    }

    fn log_text(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = t.len().saturating_sub(4000);
        t.get(start..).unwrap_or(&t).to_string()
    }

    /// One WebDriver command; its `value`, or the WebDriver error.
    fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        let v = self.request(method, &path, body)?;
        Ok(v["value"].clone())
    }

    /// One HTTP request to chromedriver (which accepts only a loopback `Host`).
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        // chromedriver keeps the connection open: read the head, then Content-Length bytes.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let split = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("no HTTP head from chromedriver for {method} {path}");
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            bail!("chromedriver answered chunked, which this client does not read");
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no Content-Length from chromedriver for {method} {path}"))?;
        while raw.len() < split + 4 + len {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("chromedriver's answer to {method} {path} was cut short");
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let v: Value = serde_json::from_slice(&raw[split + 4..split + 4 + len])
            .with_context(|| format!("{method} {path}: the answer is not JSON"))?;
        if let Some(e) = v["value"]["error"].as_str() {
            bail!(
                "{method} {path}: {e}: {}",
                v["value"]["message"].as_str().unwrap_or("")
            );
        }
        Ok(v)
    }

    /// Load `url`.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.command("POST", "/url", Some(&json!({"url": url})))?;
        Ok(())
    }

    /// The first element matching the CSS `selector`, if any.
    pub fn find(&self, selector: &str) -> Result<Option<Element>> {
        let v = self.command(
            "POST",
            "/elements",
            Some(&json!({"using": "css selector", "value": selector})),
        )?;
        Ok(v.as_array()
            .and_then(|a| a.first())
            .and_then(|e| e[ELEMENT].as_str())
            .map(|id| Element(id.to_string())))
    }

    /// Wait up to `limit` for an element matching `selector` whose text contains `text`.
    pub fn wait_for_text(&self, selector: &str, text: &str, limit: Duration) -> Result<Element> {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        loop {
            let v = self.command(
                "POST",
                "/elements",
                Some(&json!({"using": "css selector", "value": selector})),
            )?;
            for e in v.as_array().into_iter().flatten() {
                if let Some(id) = e[ELEMENT].as_str() {
                    let el = Element(id.to_string());
                    let t = self.text(&el).unwrap_or_default();
                    if t.contains(text) {
                        return Ok(el);
                    }
                    last = t;
                }
            }
            if Instant::now() > deadline {
                bail!("no {selector} with text {text:?} within {limit:?} (last: {last:?})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Click `el`.
    pub fn click(&self, el: &Element) -> Result<()> {
        self.command(
            "POST",
            &format!("/element/{}/click", el.0),
            Some(&json!({})),
        )?;
        Ok(())
    }

    /// Type `text` into `el`.
    pub fn send_keys(&self, el: &Element, text: &str) -> Result<()> {
        self.command(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(&json!({"text": text})),
        )?;
        Ok(())
    }

    /// Empty the input `el`.
    pub fn clear(&self, el: &Element) -> Result<()> {
        self.command(
            "POST",
            &format!("/element/{}/clear", el.0),
            Some(&json!({})),
        )?;
        Ok(())
    }

    /// The rendered text of `el`.
    pub fn text(&self, el: &Element) -> Result<String> {
        let v = self.command("GET", &format!("/element/{}/text", el.0), None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Run `script` (a function body) in the page with `args`; what it returns.
    pub fn execute(&self, script: &str, args: Value) -> Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// Resize the window to `width`x`height`.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.command(
            "POST",
            "/window/rect",
            Some(&json!({"width": width, "height": height})),
        )?;
        Ok(())
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.command("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .context("the screenshot is not base64")?;
        if !png.starts_with(b"\x89PNG") {
            bail!("the screenshot is not a PNG");
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
