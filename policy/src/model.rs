//! The raw TOML shape of a policy file, as deserialized by serde. Every table denies unknown
//! fields; values keep their source spans so validation can locate its errors. Required keys are
//! `Option`s here so that validation can report *all* missing keys at once, located at their
//! table, instead of serde stopping at the first.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub(crate) use crate::broker::{RawBroker, RawChannel, RawSecret};

pub(crate) type S<T> = Spanned<T>;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub version: Option<S<toml::Value>>,
    #[serde(default)]
    pub profiles: BTreeMap<S<String>, S<RawProfile>>,
    #[serde(default)]
    pub exec: Vec<S<RawExec>>,
    #[serde(default)]
    pub test: Vec<S<RawTest>>,
    #[serde(default)]
    pub secrets: BTreeMap<S<String>, S<RawSecret>>,
    #[serde(default)]
    pub channels: BTreeMap<S<String>, S<RawChannel>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    pub why: Option<S<String>>,
    pub extends: Option<S<String>>,
    pub hostname: Option<S<String>>,
    pub user: Option<S<RawUser>>,
    pub namespaces: Option<S<RawNamespaces>>,
    pub filesystem: Option<S<RawFilesystem>>,
    pub network: Option<S<RawNetwork>>,
    pub limits: Option<S<RawLimits>>,
    pub landlock: Option<S<RawLandlock>>,
    pub seccomp: Option<S<RawSeccomp>>,
    pub environment: Option<S<RawEnvironment>>,
    pub broker: Option<S<RawBroker>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    pub uid: Option<S<u32>>,
    pub gid: Option<S<u32>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNamespaces {
    pub user: Option<S<bool>>,
    pub pid: Option<S<bool>>,
    pub mount: Option<S<bool>>,
    pub ipc: Option<S<bool>>,
    pub uts: Option<S<bool>>,
    pub net: Option<S<bool>>,
    pub cgroup: Option<S<bool>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFilesystem {
    pub mounts: Option<Vec<S<RawMount>>>,
    pub symlinks: Option<Vec<S<RawSymlink>>>,
    pub tmpfs: Option<Vec<S<RawTmpfs>>>,
    pub workspace: Option<S<RawWorkspace>>,
    pub proc: Option<S<bool>>,
    pub devpts: Option<S<bool>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMount {
    pub path: Option<S<String>>,
    pub access: Option<S<String>>,
    pub optional: Option<S<bool>>,
    /// Documentation for readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSymlink {
    pub path: Option<S<String>>,
    pub target: Option<S<String>>,
    /// Documentation for readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTmpfs {
    pub path: Option<S<String>>,
    pub size: Option<S<toml::Value>>,
    pub mode: Option<S<toml::Value>>,
    pub exec: Option<S<bool>>,
    /// Documentation for readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkspace {
    pub path: Option<S<String>>,
    pub access: Option<S<String>>,
    /// Documentation for readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub mode: Option<S<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory: Option<S<toml::Value>>,
    pub pids: Option<S<toml::Value>>,
    pub cpu: Option<S<toml::Value>>,
    pub wall_time: Option<S<toml::Value>>,
    pub cpu_time: Option<S<toml::Value>>,
    pub open_files: Option<S<toml::Value>>,
    pub file_size: Option<S<toml::Value>>,
    pub core_dumps: Option<S<bool>>,
    pub processes: Option<S<toml::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLandlock {
    pub min_abi: Option<S<toml::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSeccomp {
    pub default_action: Option<S<String>>,
    pub errno: Option<S<String>>,
    pub allow: Option<Vec<S<String>>>,
    pub deny: Option<Vec<S<RawDeny>>>,
    pub socket_domains: Option<S<Vec<S<String>>>>,
    pub ioctl_requests: Option<S<Vec<S<String>>>>,
    pub clone_deny_flags: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeny {
    pub syscall: Option<S<String>>,
    pub action: Option<S<String>>,
    pub errno: Option<S<String>>,
    /// Documentation for readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub why: Option<S<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnvironment {
    pub pass: Option<S<Vec<S<String>>>>,
    pub set: Option<BTreeMap<S<String>, S<String>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExec {
    pub why: Option<S<String>>,
    pub program: Option<S<String>>,
    pub programs: Option<S<Vec<S<String>>>>,
    pub args: Option<S<Vec<S<String>>>>,
    pub profile: Option<S<String>>,
    pub approval: Option<S<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTest {
    pub command: Option<S<Vec<S<String>>>>,
    pub expect: Option<S<String>>,
    pub profile: Option<S<String>>,
    /// Documentation for readers of the policy; accepted, not used.
    #[allow(dead_code)]
    pub why: Option<S<String>>,
}
