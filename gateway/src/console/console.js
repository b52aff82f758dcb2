// The carapace operator console. Plain JavaScript, no framework, nothing fetched from
// elsewhere. Data is written into the page with textContent only (never as HTML): a session's
// text, a held message or an audit record cannot run as script.
//
// The token is kept in this tab's sessionStorage. It is checked with `gateway.status` over
// POST /rpc (Authorization header), then the console opens /ws offering the subprotocols
// "carapace.jsonrpc" and "carapace.bearer.TOKEN" (browsers cannot set headers on a WebSocket,
// and a token in the URL would land in logs). Everything else is JSON-RPC over that socket.
"use strict";

(function () {
  const KEY = "carapace.console.token";
  const PROTOCOL = "carapace.jsonrpc";
  const TOKEN_PROTOCOL = "carapace.bearer.";

  const $ = (id) => document.getElementById(id);

  let socket = null;
  let nextId = 1;
  const pending = new Map();
  const approvals = new Map();
  let view = "approvals";
  let retry = null;
  let signedIn = false;

  // ---- small DOM helpers (text only) --------------------------------------------------------

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function button(text, onClick, cls) {
    const b = el("button", text, cls);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function field(dl, name, value) {
    dl.appendChild(el("dt", name));
    dl.appendChild(el("dd", typeof value === "string" ? value : JSON.stringify(value)));
  }

  function notice(text) {
    $("notice").textContent = text || "";
  }

  function setConn(text) {
    $("conn").textContent = text;
  }

  function describe(e) {
    if (!e) return "unknown error";
    if (e.data && e.data.kind) return e.data.kind + ": " + e.message;
    return e.message || String(e);
  }

  function who(w) {
    if (!w) return "";
    if (typeof w === "string") return w;
    return [w.role, w.profile].filter(Boolean).join(" ") + (w.id !== undefined ? " #" + w.id : "");
  }

  // ---- sign in ------------------------------------------------------------------------------

  async function check(token) {
    let r;
    try {
      r = await fetch("/rpc", {
        method: "POST",
        headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "gateway.status", params: {} }),
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (e) {
      throw new Error("The gateway cannot be reached.");
    }
    if (r.status === 401) throw new Error("Refused: the gateway does not know this token (wrong or revoked).");
    if (r.status === 429) throw new Error("Refused: too many failed attempts from this address; wait a moment.");
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok || !body) throw new Error("The gateway answered " + r.status + ".");
    if (body.error) throw new Error("Refused: " + describe(body.error));
    const caller = body.result && body.result.caller;
    if (!caller || caller.scope !== "operator") {
      throw new Error("Refused: this token has the " + (caller ? caller.scope : "unknown") +
        " scope; the console needs an operator token.");
    }
    return body.result;
  }

  async function signIn(token) {
    $("login-error").textContent = "";
    $("login-button").disabled = true;
    try {
      const status = await check(token);
      sessionStorage.setItem(KEY, token);
      signedIn = true;
      $("login").hidden = true;
      $("app").hidden = false;
      $("logout").hidden = false;
      $("token").value = "";
      renderStatus(status);
      connect();
      show(view);
    } catch (e) {
      sessionStorage.removeItem(KEY);
      $("login-error").textContent = e.message;
      $("token").focus();
    } finally {
      $("login-button").disabled = false;
    }
  }

  function signOut(message) {
    signedIn = false;
    sessionStorage.removeItem(KEY);
    if (retry) { clearTimeout(retry); retry = null; }
    if (socket) { const s = socket; socket = null; s.close(1000, "signed out"); }
    for (const [, p] of pending) p.reject(new Error("signed out"));
    pending.clear();
    approvals.clear();
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setConn("not signed in");
    $("token").focus();
  }

  // ---- the socket ---------------------------------------------------------------------------

  function connect() {
    const token = sessionStorage.getItem(KEY);
    if (!token || !signedIn) return;
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    let s;
    try {
      s = new WebSocket(url, [PROTOCOL, TOKEN_PROTOCOL + token]);
    } catch (e) {
      setConn("cannot connect: " + e.message);
      return;
    }
    socket = s;
    setConn("connecting…");
    s.addEventListener("open", () => {
      if (socket !== s) return;
      setConn("connected");
      document.body.dataset.connected = "yes";
      approvals.clear();
      renderApprovals();
      refresh(view);
    });
    s.addEventListener("message", (ev) => onFrame(ev.data));
    s.addEventListener("close", (ev) => {
      if (socket !== s) return;
      socket = null;
      document.body.dataset.connected = "no";
      for (const [, p] of pending) p.reject(new Error("the connection closed"));
      pending.clear();
      if (ev.code === 1008) {
        signOut("The token was revoked.");
        return;
      }
      setConn("disconnected; reconnecting…");
      retry = setTimeout(() => { retry = null; connect(); }, 2000);
    });
  }

  function onFrame(text) {
    let m;
    try { m = JSON.parse(text); } catch (e) { return; }
    if (m.id !== undefined && m.id !== null && pending.has(m.id)) {
      const p = pending.get(m.id);
      pending.delete(m.id);
      if (m.error) p.reject(m.error); else p.resolve(m.result);
      return;
    }
    if (m.method === "approval.requested" && m.params) {
      approvals.set(m.params.id, m.params);
      renderApprovals();
    } else if (m.method === "approval.resolved" && m.params) {
      approvals.delete(m.params.id);
      renderApprovals();
    } else if (m.method === "messages.inbound" && view === "held") {
      refresh("held");
    }
  }

  function call(method, params) {
    return new Promise((resolve, reject) => {
      if (!socket || socket.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      const id = nextId++;
      pending.set(id, { resolve, reject });
      socket.send(JSON.stringify({ jsonrpc: "2.0", id, method, params: params || {} }));
    });
  }

  async function act(what, f) {
    notice("");
    try {
      await f();
    } catch (e) {
      notice(what + " failed: " + describe(e));
    }
  }

  // ---- views --------------------------------------------------------------------------------

  function show(name) {
    view = name;
    for (const t of document.querySelectorAll(".tab")) {
      const on = t.dataset.view === name;
      t.setAttribute("aria-current", on ? "page" : "false");
    }
    for (const v of document.querySelectorAll(".view")) {
      v.hidden = v.id !== "view-" + name;
    }
    document.body.dataset.view = name;
    refresh(name);
  }

  function refresh(name) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    if (name === "status") {
      act("Status", async () => renderStatus(await call("gateway.status")));
      act("Channels", async () => renderChannels(await call("channels.list")));
      act("Children", async () => renderChildren(await call("children.list")));
    }
    if (name === "held") act("Held messages", async () => renderHeld(await call("held.list")));
    if (name === "dlq") act("Dead letters", async () => renderDlq(await call("dlq.list")));
    if (name === "sessions") act("Sessions", async () => renderSessions(await call("sessions.list")));
    if (name === "audit") queryAudit();
  }

  function renderStatus(s) {
    const dl = $("status-list");
    clear(dl);
    if (!s) return;
    if (s.caller) field(dl, "signed in as", s.caller.name + " (" + s.caller.scope + ", token " + s.caller.token + ")");
    field(dl, "gateway uptime", s.uptime_secs + " s");
    field(dl, "broker", s.broker ? "connected" : "unavailable");
    field(dl, "agent", s.agent ? "configured" : "no model configured");
    field(dl, "answers channels", s.answers_channels ? "yes" : "no");
    for (const k of ["pid", "Uid", "NoNewPrivs", "Seccomp", "CapEff", "interfaces"]) {
      if (s[k] !== undefined) field(dl, k, s[k]);
    }
  }

  function renderChildren(r) {
    const ul = $("children-list");
    clear(ul);
    const items = (r && r.children) || [];
    $("children-empty").hidden = items.length > 0;
    for (const c of items) {
      const li = el("li", null, "card child " + c.state);
      li.dataset.child = c.name;
      li.appendChild(el("h3", c.name + " — " + c.state));
      const dl = el("dl", null, "kv");
      field(dl, "role", c.role + " (profile " + c.profile + ")");
      if (c.pid !== null && c.pid !== undefined) field(dl, "pid", String(c.pid));
      if (c.uptime_secs !== null && c.uptime_secs !== undefined) field(dl, "up for", c.uptime_secs + " s");
      field(dl, "restarts", String(c.restarts));
      if (c.last_exit) field(dl, "last exit", c.last_exit);
      li.appendChild(dl);
      ul.appendChild(li);
    }
  }

  function renderChannels(r) {
    const ul = $("channels-list");
    clear(ul);
    const items = (r && r.channels) || [];
    $("channels-empty").hidden = items.length > 0;
    for (const c of items) {
      const li = el("li", null, "card channel");
      li.dataset.channel = c.channel;
      let state = "no adapter state reported";
      if (c.connected === true) state = "connected";
      if (c.connected === false) state = "not connected" + (c.error ? ": " + c.error : "");
      li.appendChild(el("h3", c.channel + " — " + state));
      const dl = el("dl", null, "kv");
      field(dl, "queued for the agent", String(c.queued));
      field(dl, "held", String(c.held));
      field(dl, "outbox", String(c.outbox));
      field(dl, "dead letters", String(c.dead_lettered));
      field(dl, "last in", c.last_in || "never");
      field(dl, "last out", c.last_out || "never");
      li.appendChild(dl);
      ul.appendChild(li);
    }
  }

  function renderApprovals() {
    const ul = $("approvals-list");
    clear(ul);
    const items = Array.from(approvals.values()).sort((a, b) => a.id - b.id);
    $("approvals-empty").hidden = items.length > 0;
    $("approvals-count").textContent = items.length ? "(" + items.length + ")" : "";
    for (const a of items) {
      const li = el("li", null, "card approval");
      li.dataset.id = String(a.id);
      li.appendChild(el("h3", "#" + a.id + " " + a.program));
      const dl = el("dl", null, "kv");
      field(dl, "command", (a.argv || []).join(" "));
      field(dl, "profile", a.profile || "");
      field(dl, "asked by", who(a.who));
      if (a.why) field(dl, "why asked", a.why);
      if (a.expires_in_ms !== undefined) field(dl, "expires in", Math.round(a.expires_in_ms / 1000) + " s");
      li.appendChild(dl);
      const bar = el("div", null, "actions");
      const answer = (resolution) => () => act("Answering #" + a.id, async () => {
        await call("approvals.resolve", { id: a.id, resolution });
        approvals.delete(a.id);
        renderApprovals();
        notice("#" + a.id + ": " + resolution);
      });
      bar.appendChild(button("Allow once", answer("allow-once"), "allow"));
      bar.appendChild(button("Allow always", answer("allow-always"), "always"));
      bar.appendChild(button("Deny", answer("deny"), "deny"));
      li.appendChild(bar);
      ul.appendChild(li);
    }
  }

  function renderHeld(r) {
    const ul = $("held-list");
    clear(ul);
    const items = (r && r.held) || [];
    $("held-empty").hidden = items.length > 0;
    for (const h of items) {
      const li = el("li", null, "card held");
      li.dataset.id = h.id;
      li.appendChild(el("h3", h.channel + ": " + h.sender));
      li.appendChild(el("p", h.body, "body"));
      const dl = el("dl", null, "kv");
      field(dl, "conversation", h.conversation || "");
      field(dl, "received", h.ts || "");
      li.appendChild(dl);
      const bar = el("div", null, "actions");
      bar.appendChild(button("Admit this message", () => act("Admit", async () => {
        await call("held.admit", { id: h.id, always: false });
        refresh("held");
      }), "allow"));
      bar.appendChild(button("Admit the sender", () => act("Admit", async () => {
        await call("held.admit", { id: h.id, always: true });
        refresh("held");
      }), "always"));
      bar.appendChild(button("Drop", () => act("Drop", async () => {
        await call("held.drop", { id: h.id });
        refresh("held");
      }), "deny"));
      li.appendChild(bar);
      ul.appendChild(li);
    }
    if (r && r.omitted) ul.appendChild(el("li", r.omitted + " more not shown", "empty"));
  }

  function renderDlq(r) {
    const ul = $("dlq-list");
    clear(ul);
    const items = (r && r.dead_letters) || [];
    $("dlq-empty").hidden = items.length > 0;
    for (const d of items) {
      const li = el("li", null, "card dead");
      li.dataset.id = d.id;
      li.appendChild(el("h3", d.channel + " → " + d.recipient));
      li.appendChild(el("p", d.body, "body"));
      const dl = el("dl", null, "kv");
      field(dl, "reason", d.reason || "");
      field(dl, "from", who(d.who));
      field(dl, "when", d.ts || "");
      li.appendChild(dl);
      const bar = el("div", null, "actions");
      bar.appendChild(button("Release", () => act("Release", async () => {
        await call("dlq.release", { id: d.id });
        refresh("dlq");
      }), "allow"));
      bar.appendChild(button("Drop", () => act("Drop", async () => {
        await call("dlq.drop", { id: d.id });
        refresh("dlq");
      }), "deny"));
      li.appendChild(bar);
      ul.appendChild(li);
    }
    if (r && r.omitted) ul.appendChild(el("li", r.omitted + " more not shown", "empty"));
    if (r && r.unreadable) ul.appendChild(el("li", r.unreadable + " unreadable entries (see the log)", "empty"));
  }

  function renderSessions(r) {
    const ul = $("sessions-list");
    clear(ul);
    const items = (r && r.sessions) || [];
    $("sessions-empty").hidden = items.length > 0;
    for (const s of items) {
      const name = typeof s === "string" ? s : s.name;
      const li = el("li");
      li.appendChild(button(name, () => openSession(name), "session"));
      ul.appendChild(li);
    }
  }

  function openSession(name) {
    act("History", async () => {
      const h = await call("sessions.history", { session: name, limit: 200 });
      const ol = $("history");
      clear(ol);
      $("history-title").hidden = false;
      $("history-title").textContent = "History of " + name;
      for (const line of h.messages || []) {
        const m = line.message || line;
        const li = el("li", null, "msg " + (m.role || line.kind || "other"));
        li.appendChild(el("span", m.role || line.kind || "?", "role"));
        let text = m.content;
        if (text === undefined || text === null) text = "";
        if (typeof text !== "string") text = JSON.stringify(text);
        if (line.kind === "usage") text = "usage: " + JSON.stringify(line.usage) + ", stopped: " + line.stopped;
        if (m.tool_calls) {
          for (const c of m.tool_calls) {
            const f = c.function || {};
            text += (text ? "\n" : "") + "→ " + (f.name || "tool") + " " + (f.arguments || "");
          }
        }
        li.appendChild(el("pre", text, "text"));
        ol.appendChild(li);
      }
      $("history-title").focus();
    });
  }

  function queryAudit() {
    const params = {};
    const op = $("audit-op").value.trim();
    const decision = $("audit-decision").value;
    const limit = parseInt($("audit-limit").value, 10);
    if (op) params.op = op;
    if (decision) params.decision = decision;
    if (limit > 0) params.limit = limit;
    act("Audit", async () => {
      const r = await call("audit.query", params);
      const ol = $("audit-list");
      clear(ol);
      const items = (r && r.records) || [];
      $("audit-empty").hidden = items.length > 0;
      for (const rec of items) {
        const li = el("li", null, "record " + (rec.decision || ""));
        li.appendChild(el("span", "#" + rec.seq + " " + (rec.ts || ""), "when"));
        li.appendChild(el("span", rec.op + " " + (rec.target || ""), "what"));
        li.appendChild(el("span", rec.decision + (rec.outcome ? " / " + rec.outcome : ""), "decision"));
        li.appendChild(el("span", who(rec.who), "who"));
        ol.appendChild(li);
      }
      $("audit-more").hidden = !(r && r.more);
    });
  }

  // ---- start --------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("history-title").tabIndex = -1;
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const t = $("token").value.trim();
      if (!t) { $("login-error").textContent = "Paste a token first."; return; }
      signIn(t);
    });
    $("logout").addEventListener("click", () => signOut(""));
    $("audit-form").addEventListener("submit", (e) => { e.preventDefault(); queryAudit(); });
    for (const t of document.querySelectorAll(".tab")) {
      t.addEventListener("click", () => show(t.dataset.view));
    }
    for (const b of document.querySelectorAll(".refresh")) {
      b.addEventListener("click", () => refresh(b.dataset.refresh));
    }
    setInterval(() => { if (view === "held" || view === "dlq") refresh(view); }, 5000);
    const saved = sessionStorage.getItem(KEY);
    if (saved) signIn(saved); else $("token").focus();
  });
})();
