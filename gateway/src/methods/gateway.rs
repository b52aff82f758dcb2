//! `gateway.ping`, `gateway.status`.

use serde_json::{json, Map, Value};

use super::NoParams;
use crate::app::App;
use crate::auth::Caller;
use crate::rpc::{params, RpcError};

pub fn ping(p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    Ok(json!({"pong": true}))
}

pub fn status(app: &App, caller: &Caller, p: Value) -> Result<Value, RpcError> {
    params::<NoParams>(p)?;
    let mut v = confinement();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "caller".into(),
            json!({"token": caller.token_id, "name": caller.name, "scope": caller.scope}),
        );
        o.insert("uptime_secs".into(), app.started.elapsed().as_secs().into());
        o.insert("broker".into(), app.broker.is_available().into());
        o.insert("agent".into(), app.settings.agent.is_some().into());
        let answers = app
            .settings
            .agent
            .as_ref()
            .is_some_and(|a| a.answer_channels)
            && app.broker.is_available();
        o.insert("answers_channels".into(), answers.into());
    }
    Ok(v)
}

/// Fields of /proc/self/status that show the confinement.
const STATUS_FIELDS: &[&str] = &[
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
];

/// The gateway's own confinement as the kernel reports it, and its network interfaces.
pub fn confinement() -> Value {
    let mut m = Map::new();
    m.insert("pid".into(), std::process::id().into());
    match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => {
            for line in s.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    if STATUS_FIELDS.contains(&k) {
                        // "1000\t1000\t1000\t1000" -> "1000 1000 1000 1000"
                        let words: Vec<&str> = v.split_whitespace().collect();
                        m.insert(k.into(), words.join(" ").into());
                    }
                }
            }
        }
        Err(e) => {
            m.insert("error".into(), format!("/proc/self/status: {e}").into());
        }
    }
    let ifaces: Vec<String> = std::fs::read_to_string("/proc/self/net/dev")
        .map(|s| interfaces(&s))
        .unwrap_or_default();
    m.insert("interfaces".into(), ifaces.into());
    Value::Object(m)
}

/// Interface names of a /proc/net/dev table (two header lines, then `name: counters`).
fn interfaces(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(interfaces(dev), vec!["lo", "eth0"]);
    }

    #[test]
    fn own_status_has_the_confinement_fields() {
        let v = confinement();
        assert!(v["Seccomp"].is_string() && v["CapEff"].is_string(), "{v}");
        assert!(v["interfaces"].is_array());
    }

    #[test]
    fn ping_takes_no_params() {
        assert!(ping(json!({})).is_ok());
        assert!(ping(json!({"x": 1})).is_err());
    }
}
