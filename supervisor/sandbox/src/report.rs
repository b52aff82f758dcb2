//! The exit report of one confined run, its exit-code mapping, and its two renderings (the
//! one-line stderr summary and JSON).

use std::time::Duration;

use serde::Serialize;

/// How a confined run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit status when the program exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    pub wall: Duration,
    pub cpu: Duration,
    /// Peak memory in bytes (cgroup peak when available, else max RSS).
    pub peak_mem: u64,
    pub oom_killed: bool,
    pub timed_out: bool,
}

/// Exit code: timed out (like timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code: denied by policy or approval refused.
pub const EXIT_DENIED: i32 = 125;
/// Exit code: carapace could not start the program.
pub const EXIT_SETUP: i32 = 126;
/// Exit code: the program was not found (as shells and `env` say it).
pub const EXIT_NOT_FOUND: i32 = 127;

impl ExitReport {
    /// The report of a program that could not be started or waited for: exit 126, nothing
    /// measured.
    pub fn setup_failure() -> ExitReport {
        ExitReport {
            code: Some(EXIT_SETUP),
            signal: None,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
            peak_mem: 0,
            oom_killed: false,
            timed_out: false,
        }
    }

    /// The exit code `carapace exec` returns: the program's own; 128+N for signal N; 124 when
    /// the wall-time limit killed it.
    pub fn exit_code(&self) -> i32 {
        if self.timed_out {
            EXIT_TIMEOUT
        } else if let Some(s) = self.signal {
            128 + s
        } else {
            self.code.unwrap_or(EXIT_SETUP)
        }
    }

    /// `carapace: exit=<code> signal=<n|-> wall=<ms>ms cpu=<ms>ms peak_mem=<bytes> oom=<bool> timeout=<bool>`
    pub fn line(&self) -> String {
        format!(
            "carapace: exit={} signal={} wall={}ms cpu={}ms peak_mem={} oom={} timeout={}",
            self.exit_code(),
            self.signal
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
            self.wall.as_millis(),
            self.cpu.as_millis(),
            self.peak_mem,
            self.oom_killed,
            self.timed_out
        )
    }

    /// A plain-words note for stderr when the run ended abnormally, e.g. the OOM kill.
    pub fn note(&self) -> Option<String> {
        if self.timed_out {
            Some(format!(
                "carapace: wall-time limit reached after {}ms: the whole process tree was killed \
                 (exit 124)",
                self.wall.as_millis()
            ))
        } else if self.oom_killed && self.signal == Some(libc::SIGKILL) {
            Some(
                "carapace: killed by the kernel's OOM killer: the profile's memory limit was \
                 reached (exit 137)"
                    .to_string(),
            )
        } else if self.signal == Some(libc::SIGXCPU) {
            Some(
                "carapace: the CPU-time limit ended it (SIGXCPU): the profile's cpu_time, or in \
                 rootless mode without a cgroup the rlimit standing in for its cpu limit"
                    .to_string(),
            )
        } else if self.oom_killed {
            Some(
                "carapace: the memory limit was hit (a process of the sandbox was OOM-killed)"
                    .to_string(),
            )
        } else {
            None
        }
    }

    pub fn json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct J {
            exit_code: i32,
            code: Option<i32>,
            signal: Option<i32>,
            wall_ms: u128,
            cpu_ms: u128,
            peak_mem_bytes: u64,
            oom_killed: bool,
            timed_out: bool,
        }
        serde_json::to_value(J {
            exit_code: self.exit_code(),
            code: self.code,
            signal: self.signal,
            wall_ms: self.wall.as_millis(),
            cpu_ms: self.cpu.as_millis(),
            peak_mem_bytes: self.peak_mem,
            oom_killed: self.oom_killed,
            timed_out: self.timed_out,
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ExitReport {
        ExitReport {
            code: Some(0),
            wall: Duration::from_millis(12),
            cpu: Duration::from_millis(3),
            peak_mem: 4096,
            ..ExitReport::setup_failure()
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(base().exit_code(), 0);
        assert_eq!(
            ExitReport {
                code: Some(3),
                ..base()
            }
            .exit_code(),
            3
        );
        let sig = ExitReport {
            code: None,
            signal: Some(9),
            ..base()
        };
        assert_eq!(sig.exit_code(), 137);
        assert_eq!(
            ExitReport {
                timed_out: true,
                ..sig
            }
            .exit_code(),
            124
        );
    }

    #[test]
    fn line_format() {
        assert_eq!(
            base().line(),
            "carapace: exit=0 signal=- wall=12ms cpu=3ms peak_mem=4096 oom=false timeout=false"
        );
        let r = ExitReport {
            code: None,
            signal: Some(9),
            oom_killed: true,
            ..base()
        };
        assert_eq!(
            r.line(),
            "carapace: exit=137 signal=9 wall=12ms cpu=3ms peak_mem=4096 oom=true timeout=false"
        );
        assert!(r.note().unwrap().contains("OOM"));
        assert!(base().note().is_none());
    }

    #[test]
    fn json_fields() {
        let j = ExitReport {
            code: None,
            signal: Some(9),
            timed_out: true,
            ..base()
        }
        .json();
        assert_eq!(j["exit_code"], 124);
        assert_eq!(j["signal"], 9);
        assert_eq!(j["timed_out"], true);
        assert_eq!(j["wall_ms"], 12);
        assert!(j["code"].is_null());
    }
}
