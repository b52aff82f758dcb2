//! The shape of a policy file (which keys exist, what type each value has), checked by the
//! [`crate::toml_schema`] engine on the spanned TOML document *before* serde runs, so that every
//! unknown key and every wrong type in a file is reported at once instead of serde's first one.
//! It mirrors `model.rs`; a test keeps the two in step (every key of the schema is accepted by
//! serde and the reverse).

use crate::toml_schema::Kind::{self, *};

const USER: Kind = Table(&[("uid", U32), ("gid", U32)]);
const NAMESPACES: Kind = Table(&[
    ("user", Bool),
    ("pid", Bool),
    ("mount", Bool),
    ("ipc", Bool),
    ("uts", Bool),
    ("net", Bool),
    ("cgroup", Bool),
]);
const MOUNT: Kind = Table(&[
    ("path", Str),
    ("access", Str),
    ("optional", Bool),
    ("why", Str),
]);
const SYMLINK: Kind = Table(&[("path", Str), ("target", Str), ("why", Str)]);
const TMPFS: Kind = Table(&[
    ("path", Str),
    ("size", IntOrStr),
    ("mode", IntOrStr),
    ("exec", Bool),
    ("why", Str),
]);
const WORKSPACE: Kind = Table(&[("path", Str), ("access", Str), ("why", Str)]);
const FILESYSTEM: Kind = Table(&[
    ("mounts", Array(&MOUNT)),
    ("symlinks", Array(&SYMLINK)),
    ("tmpfs", Array(&TMPFS)),
    ("workspace", WORKSPACE),
    ("proc", Bool),
    ("devpts", Bool),
]);
const NETWORK: Kind = Table(&[("mode", Str)]);
const LIMITS: Kind = Table(&[
    ("memory", IntOrStr),
    ("pids", Int),
    ("cpu", Number),
    ("wall_time", IntOrStr),
    ("cpu_time", IntOrStr),
    ("open_files", Int),
    ("file_size", IntOrStr),
    ("core_dumps", Bool),
    ("processes", Int),
]);
const LANDLOCK: Kind = Table(&[("min_abi", IntOrStr)]);
const DENY: Kind = Table(&[
    ("syscall", Str),
    ("action", Str),
    ("errno", Str),
    ("why", Str),
]);
const SECCOMP: Kind = Table(&[
    ("default_action", Str),
    ("errno", Str),
    ("allow", Array(&Str)),
    ("deny", Array(&DENY)),
    ("socket_domains", Array(&Str)),
    ("ioctl_requests", Array(&Str)),
    ("clone_deny_flags", Array(&Str)),
]);
const ENVIRONMENT: Kind = Table(&[("pass", Array(&Str)), ("set", Map(&Str))]);
const CONNECT: Kind = Table(&[
    ("host", Str),
    ("port", Int),
    ("allow_private", Bool),
    ("why", Str),
]);
const OPEN: Kind = Table(&[
    ("path", Str),
    ("access", Str),
    ("approval", Str),
    ("why", Str),
]);
const PEER_RATE: Kind = Table(&[("requests_per_second", Int), ("burst", Int)]);
const BROKER: Kind = Table(&[
    ("connect", Array(&CONNECT)),
    ("open", Array(&OPEN)),
    ("secrets", Array(&Str)),
    ("channels", Array(&Str)),
    ("deliver", Array(&Str)),
    ("exec", Bool),
    ("auth", Bool),
    ("approve", Bool),
    ("inbound", Bool),
    ("rate", PEER_RATE),
    ("redact", Array(&Str)),
]);
const SECRET: Kind = Table(&[("why", Str), ("file", Str), ("credential", Str)]);
const CHANNEL_RATE: Kind = Table(&[("per_minute", Int), ("burst", Int)]);
const CHANNEL_RETRY: Kind = Table(&[
    ("attempts", Int),
    ("initial_delay", IntOrStr),
    ("max_delay", IntOrStr),
]);
const CHANNEL: Kind = Table(&[
    ("why", Str),
    ("kind", Str),
    ("path", Str),
    ("recipients", Array(&Str)),
    ("block", Array(&Str)),
    ("redact", Array(&Str)),
    ("max_bytes", IntOrStr),
    ("rate", CHANNEL_RATE),
    ("senders", Array(&Str)),
    ("reply_to_senders", Bool),
    ("retry", CHANNEL_RETRY),
    ("operator", Str),
]);
const PROFILE: Kind = Table(&[
    ("why", Str),
    ("extends", Str),
    ("hostname", Str),
    ("user", USER),
    ("namespaces", NAMESPACES),
    ("filesystem", FILESYSTEM),
    ("network", NETWORK),
    ("limits", LIMITS),
    ("landlock", LANDLOCK),
    ("seccomp", SECCOMP),
    ("environment", ENVIRONMENT),
    ("broker", BROKER),
]);
const EXEC: Kind = Table(&[
    ("why", Str),
    ("program", Str),
    ("programs", Array(&Str)),
    ("args", Array(&Str)),
    ("profile", Str),
    ("approval", Str),
]);
const TEST: Kind = Table(&[
    ("command", Array(&Str)),
    ("expect", Str),
    ("profile", Str),
    ("why", Str),
]);
/// The whole file.
pub(crate) const POLICY: Kind = Table(&[
    ("version", U32),
    ("profiles", Map(&PROFILE)),
    ("exec", Array(&EXEC)),
    ("test", Array(&TEST)),
    ("secrets", Map(&SECRET)),
    ("channels", Map(&CHANNEL)),
]);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::*;
    use crate::model::*;
    use serde::de::DeserializeOwned;

    /// The keys serde's `deny_unknown_fields` lists for `T`.
    fn serde_keys<T: DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err = match toml::from_str::<T>("zzz_not_a_key = 1") {
            Ok(v) => panic!("accepted an unknown key: {v:?}"),
            Err(e) => e.message().to_string(),
        };
        let tail = err.split("expected").nth(1).unwrap_or_default();
        let mut keys: Vec<String> = tail
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    fn schema_keys(kind: &Kind) -> Vec<String> {
        let Table(fields) = kind else {
            panic!("not a table")
        };
        let mut keys: Vec<String> = fields.iter().map(|(n, _)| n.to_string()).collect();
        keys.sort();
        keys
    }

    #[test]
    fn schema_matches_the_serde_model() {
        assert_eq!(schema_keys(&POLICY), serde_keys::<RawPolicy>());
        assert_eq!(schema_keys(&PROFILE), serde_keys::<RawProfile>());
        assert_eq!(schema_keys(&USER), serde_keys::<RawUser>());
        assert_eq!(schema_keys(&NAMESPACES), serde_keys::<RawNamespaces>());
        assert_eq!(schema_keys(&FILESYSTEM), serde_keys::<RawFilesystem>());
        assert_eq!(schema_keys(&MOUNT), serde_keys::<RawMount>());
        assert_eq!(schema_keys(&SYMLINK), serde_keys::<RawSymlink>());
        assert_eq!(schema_keys(&TMPFS), serde_keys::<RawTmpfs>());
        assert_eq!(schema_keys(&WORKSPACE), serde_keys::<RawWorkspace>());
        assert_eq!(schema_keys(&NETWORK), serde_keys::<RawNetwork>());
        assert_eq!(schema_keys(&LIMITS), serde_keys::<RawLimits>());
        assert_eq!(schema_keys(&LANDLOCK), serde_keys::<RawLandlock>());
        assert_eq!(schema_keys(&SECCOMP), serde_keys::<RawSeccomp>());
        assert_eq!(schema_keys(&DENY), serde_keys::<RawDeny>());
        assert_eq!(schema_keys(&ENVIRONMENT), serde_keys::<RawEnvironment>());
        assert_eq!(schema_keys(&EXEC), serde_keys::<RawExec>());
        assert_eq!(schema_keys(&TEST), serde_keys::<RawTest>());
        assert_eq!(schema_keys(&BROKER), serde_keys::<RawBroker>());
        assert_eq!(schema_keys(&CONNECT), serde_keys::<RawConnect>());
        assert_eq!(schema_keys(&OPEN), serde_keys::<RawOpen>());
        assert_eq!(schema_keys(&PEER_RATE), serde_keys::<RawPeerRate>());
        assert_eq!(schema_keys(&SECRET), serde_keys::<RawSecret>());
        assert_eq!(schema_keys(&CHANNEL), serde_keys::<RawChannel>());
        assert_eq!(schema_keys(&CHANNEL_RATE), serde_keys::<RawChannelRate>());
        assert_eq!(schema_keys(&CHANNEL_RETRY), serde_keys::<RawRetry>());
    }

    #[test]
    fn a_policy_typo_gets_did_you_mean() {
        let text = "version = 1\n[profiles.p]\nwhy = \"x\"\ncolour = 1\n[profiles.p.limits]\nmemroy = \"1GiB\"\n[[exec]]\nprogrm = \"/bin/ls\"\n";
        let errs: Vec<String> = match crate::Policy::parse(text, "p.toml") {
            Ok(_) => panic!("accepted"),
            Err(d) => {
                d.0.iter()
                    .map(|d| match &d.help {
                        Some(h) => format!("{}; {h}", d.message),
                        None => d.message.clone(),
                    })
                    .collect()
            }
        };
        let has = |m: &str| errs.iter().any(|e| e == m);
        assert!(
            has("unknown key `memroy` in [profiles.p.limits]; did you mean `memory`?"),
            "{errs:?}"
        );
        assert!(
            has("unknown key `progrm` in [[exec]]; did you mean `program`?"),
            "{errs:?}"
        );
        assert!(has("unknown key `colour` in [profiles.p]"), "{errs:?}");
    }
}
