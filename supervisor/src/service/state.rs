//! What the children's threads and the control socket share: the policy in force, the running
//! service.

use super::*;

/// The policy in force and where it came from.
#[derive(Debug, Clone)]
pub(super) struct PolicyInForce {
    pub(super) policy: Arc<Policy>,
    pub(super) files: Vec<String>,
    pub(super) sha256: String,
    pub(super) loaded: String,
}

/// What the children's threads and the control socket share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) target: Target,
    /// Root or rootless, decided once at start.
    pub(super) privilege: Privilege,
    pub(super) peers: PeerServer,
    pub(super) env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    pub(super) policy: RwLock<PolicyInForce>,
    /// The service's metrics (the broker host records into them too).
    pub(super) metrics: Arc<Metrics>,
}

impl Shared {
    pub(super) fn policy(&self) -> Arc<Policy> {
        read(&self.policy).policy.clone()
    }

    pub(super) fn policy_in_force(&self) -> PolicyInForce {
        read(&self.policy).clone()
    }
}

/// The running service (what the control socket's handler sees).
pub(super) struct Service {
    pub(super) shared: Arc<Shared>,
    pub(super) host: BrokerHost,
    pub(super) config_source: Option<PathBuf>,
    pub(super) config_shown: String,
    pub(super) state: StateDir,
    pub(super) children: Mutex<Vec<(Arc<Child>, std::thread::JoinHandle<()>)>>,
    pub(super) notifier: Notifier,
    pub(super) started: SystemTime,
    pub(super) started_at: Instant,
    pub(super) mode: &'static str,
    pub(super) cgroups: String,
    pub(super) reloads: AtomicU64,
    pub(super) last_reload_error: Mutex<Option<String>>,
    /// One reload at a time (SIGHUP and `carapace reload` may race).
    pub(super) reloading: Mutex<()>,
    /// The configuration in force.
    pub(super) config: Mutex<Config>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config_shown)
            .finish_non_exhaustive()
    }
}
