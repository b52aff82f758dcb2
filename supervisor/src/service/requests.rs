//! What the service answers: status, reload, approvals, stopping the children; the control socket's
//! handler.

use super::*;

impl Service {
    pub(super) fn status(&self) -> control::StatusReport {
        let p = self.shared.policy_in_force();
        let children = lock(&self.children)
            .iter()
            .map(|(c, _)| c.status())
            .collect();
        let (seq, head) = self.host.ops.audit_head();
        control::StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: rfc3339_utc(self.started),
            uptime_secs: self.started_at.elapsed().as_secs(),
            mode: self.mode.to_string(),
            cgroups: self.cgroups.clone(),
            tools: self.host.tools_started_by(),
            config: self.config_shown.clone(),
            policy: control::PolicyStatus {
                files: p.files,
                sha256: p.sha256,
                loaded: p.loaded,
            },
            reloads: self.reloads.load(Ordering::SeqCst),
            last_reload_error: lock(&self.last_reload_error).clone(),
            children,
            pending_approvals: self.host.approvals.list().len(),
            channels: self.host.ops.channel_stats(),
            dead_letters: self
                .host
                .ops
                .dead_letters()
                .list()
                .map_or(0, |l| l.letters.len()),
            audit: control::AuditStatus {
                path: self.state.audit_log().display().to_string(),
                seq,
                head,
            },
        }
    }

    /// The children as the broker's `children` op shows them.
    pub(super) fn children_summary(&self) -> Vec<carapace_broker::protocol::ChildSummary> {
        lock(&self.children)
            .iter()
            .map(|(c, _)| {
                let s = c.status();
                carapace_broker::protocol::ChildSummary {
                    name: s.name,
                    role: s.role,
                    profile: s.profile,
                    state: s.state,
                    pid: s.pid,
                    uptime_secs: s.uptime_secs,
                    restarts: s.restarts,
                    last_exit: s.last_exit,
                }
            })
            .collect()
    }

    /// Reload the configuration (from where it came) and the policy. On any error nothing
    /// changes and the error is returned (and logged).
    pub(super) fn reload(&self) -> Result<control::ReloadReport, ServiceError> {
        let _one = lock(&self.reloading);
        let _ = self.notifier.reloading();
        let result = self.try_reload();
        match &result {
            Ok(r) => {
                self.reloads.fetch_add(1, Ordering::SeqCst);
                *lock(&self.last_reload_error) = None;
                tracing::info!("reloaded: {}", r.message);
            }
            Err(e) => {
                let e = error_chain(e);
                *lock(&self.last_reload_error) = Some(e.clone());
                tracing::error!(
                    "reload rejected; the previous configuration and policy stay in force: {e}"
                );
            }
        }
        let _ = self.notifier.ready(&self.status_line());
        result
    }

    pub(super) fn try_reload(&self) -> Result<control::ReloadReport, ServiceError> {
        let cfg = match &self.config_source {
            Some(path) => Config::load(Some(path)).map(|(c, _)| c)?,
            None => lock(&self.config).clone(),
        };
        let new = load_policy(&cfg)?;
        let exe = exe_dir();
        let mut specs = Vec::new();
        for (what, c) in cfg.children() {
            specs.push((what, spec_of(c, &exe)?));
        }
        let old_sha = self.shared.policy_in_force().sha256;
        self.host.reload((*new.policy).clone())?;
        // The granted workspaces take effect for the next request, like the policy.
        self.host.ops.set_workspaces(cfg.granted_workspaces());
        let sha = new.sha256.clone();
        *write(&self.shared.policy) = new;
        let mut changed = Vec::new();
        for (c, _) in lock(&self.children).iter() {
            if let Some((_, spec)) = specs.iter().find(|(w, _)| *w == c.name) {
                let mut cur = lock(&c.spec);
                if *cur != *spec {
                    changed.push(c.name.clone());
                    *cur = spec.clone();
                }
            }
            let mut live = lock(&c.live);
            if live.state == State::Failed {
                live.revive = true;
                c.wake.notify_all();
            }
        }
        *lock(&self.config) = cfg;
        let mut message = if sha == old_sha {
            "policy unchanged".to_string()
        } else {
            format!(
                "policy {} in force for new requests",
                &sha[..12.min(sha.len())]
            )
        };
        if !changed.is_empty() {
            message.push_str(&format!(
                "; new settings for {} apply from their next start",
                changed.join(", ")
            ));
        }
        Ok(control::ReloadReport {
            applied: true,
            policy_sha256: sha,
            message,
        })
    }

    /// The metrics exposition, with the state read now.
    pub(super) fn metrics_text(&self) -> Result<String, metrics::MetricsError> {
        let children = lock(&self.children)
            .iter()
            .map(|(c, _)| (c.name.clone(), lock(&c.live).state == State::Running))
            .collect();
        let now = metrics::Snapshot {
            approvals_pending: self.host.approvals.list().len(),
            held_messages: self.host.ops.held_messages().len(),
            dead_letters: self
                .host
                .ops
                .dead_letters()
                .list()
                .map_or(0, |l| l.letters.len()),
            children,
        };
        self.shared.metrics.encode(&now)
    }

    pub(super) fn status_line(&self) -> String {
        let kids = lock(&self.children);
        let running = kids
            .iter()
            .filter(|(c, _)| lock(&c.live).state == State::Running)
            .count();
        format!("{running}/{} children running", kids.len())
    }

    pub(super) fn approvals(&self) -> control::ApprovalsList {
        let now = Instant::now();
        control::ApprovalsList {
            pending: self
                .host
                .approvals
                .list()
                .iter()
                .map(|p| {
                    let why = lock(&self.host.reasons)
                        .get(&(p.identity.id, p.argv.clone()))
                        .cloned()
                        .unwrap_or_default();
                    control::PendingApproval::from_pending(p, why, now)
                })
                .collect(),
            always: self
                .host
                .approvals
                .grants()
                .iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// Stop: children first (SIGTERM, then kill after `grace`), then the broker.
    pub(super) fn stop_children(&self, grace: Duration) {
        let kids = std::mem::take(&mut *lock(&self.children));
        for (c, _) in &kids {
            c.terminate();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && kids.iter().any(|(c, _)| !c.is_down()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (c, _) in &kids {
            if !c.is_down() {
                tracing::warn!(child = %c.name, "did not stop within {grace:?}; killed");
                c.kill();
            }
        }
        for (c, t) in kids {
            let until = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!(child = %c.name, "its thread did not end");
            }
        }
    }
}

/// The control socket's view of the service.
pub(super) struct Handler(pub(super) Arc<Service>);

impl ControlHandler for Handler {
    fn handle(&self, req: Request) -> Result<Value, String> {
        let to_value = |v: Result<Value, serde_json::Error>| v.map_err(|e| e.to_string());
        let svc = &self.0;
        match req {
            Request::Status => to_value(serde_json::to_value(svc.status())),
            Request::ApprovalsList => to_value(serde_json::to_value(svc.approvals())),
            Request::ApprovalsResolve { id, resolution } => {
                let r = Resolution::parse(&resolution).ok_or_else(|| {
                    format!(
                        "resolution {resolution:?}: expected {}",
                        Resolution::EXPECTED
                    )
                })?;
                let d = svc
                    .host
                    .approvals
                    .resolve(id, r)
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    id,
                    decision = d.as_str(),
                    "approval answered by the operator"
                );
                to_value(serde_json::to_value(control::Resolved {
                    id,
                    decision: d.as_str().to_string(),
                }))
            }
            Request::DlqList => {
                let l = svc
                    .host
                    .ops
                    .dead_letters()
                    .list()
                    .map_err(|e| e.to_string())?;
                to_value(serde_json::to_value(control::DlqList::from(l)))
            }
            Request::DlqRelease { id } => {
                let entry = svc.host.ops.release_dead_letter(&id)?;
                tracing::info!(id = %id, "dead letter released by the operator");
                to_value(serde_json::to_value(control::DlqLetter { id, entry }))
            }
            Request::DlqDrop { id } => {
                svc.host.ops.drop_dead_letter(&id)?;
                tracing::info!(id = %id, "dead letter dropped by the operator");
                Ok(serde_json::json!({ "dropped": id }))
            }
            Request::HeldList => to_value(serde_json::to_value(control::HeldList {
                held: svc.host.ops.held_messages(),
            })),
            Request::HeldAdmit { id, always } => {
                let seq = svc.host.ops.admit_held(&id, always, Some("operator"))?;
                tracing::info!(id = %id, seq, always, "held message admitted by the operator");
                to_value(serde_json::to_value(control::Admitted { id, seq, always }))
            }
            Request::HeldDrop { id } => {
                svc.host.ops.drop_held(&id, Some("operator"))?;
                tracing::info!(id = %id, "held message dropped by the operator");
                Ok(serde_json::json!({ "dropped": id }))
            }
            Request::Reload => to_value(serde_json::to_value(
                svc.reload().map_err(|e| error_chain(&e))?,
            )),
            Request::AuditTail { .. } => Err("audit_tail is served by the control server".into()),
            Request::Metrics => to_value(serde_json::to_value(control::MetricsText {
                text: svc.metrics_text().map_err(|e| e.to_string())?,
            })),
            Request::JobsList => {
                let cfg = lock(&svc.config).clone();
                super::jobs::list(&cfg).map_err(|e| e.to_string())
            }
            Request::JobsRun { name } => {
                let cfg = lock(&svc.config).clone();
                let r = super::jobs::request_run(&cfg, &name).map_err(|e| e.to_string())?;
                tracing::info!(job = %name, run = %r["run"], "job run asked by the operator");
                Ok(r)
            }
            Request::JobsHistory { name, limit } => {
                let cfg = lock(&svc.config).clone();
                super::jobs::history(
                    &cfg,
                    name.as_deref(),
                    limit.unwrap_or(super::jobs::DEFAULT_HISTORY_RUNS),
                )
                .map_err(|e| e.to_string())
            }
        }
    }

    fn audit_log(&self) -> PathBuf {
        self.0.state.audit_log()
    }
}
