//! What the binary carries: the default policy (`carapace exec` without `--policy`, `carapace
//! run` without a configured policy, `carapace policy show-default`).

/// The embedded default policy (the same text as `policies/default.toml`).
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");
/// Name the embedded default policy has in messages.
pub const DEFAULT_POLICY_NAME: &str = "<embedded default policy: policies/default.toml>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_text_matches_the_file() {
        let file = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/default.toml"
        ))
        .unwrap();
        assert_eq!(file, DEFAULT_POLICY);
    }
}
