//! JSON-RPC 2.0 frames of the gateway protocol (docs/protocol.md, "The gateway protocol"):
//! requests in, responses and events (notifications) out, and the error table shared by the
//! WebSocket, `POST /rpc` and the REST routes.

use serde_json::{json, Map, Value};

use carapace_broker::protocol::ErrorCode as BrokerCode;

/// What went wrong, as a client sees it: a JSON-RPC code, a kind word, an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unauthorized,
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    Forbidden,
    Denied,
    RateLimited,
    TooLarge,
    Unavailable,
    Busy,
    NotFound,
    Pending,
}

impl Kind {
    pub fn code(self) -> i64 {
        match self {
            Kind::Unauthorized => -32000,
            Kind::ParseError => -32700,
            Kind::InvalidRequest => -32600,
            Kind::MethodNotFound => -32601,
            Kind::InvalidParams => -32602,
            Kind::Internal => -32603,
            Kind::Forbidden => -32001,
            Kind::Denied => -32002,
            Kind::RateLimited => -32003,
            Kind::TooLarge => -32004,
            Kind::Unavailable => -32005,
            Kind::Busy => -32006,
            Kind::NotFound => -32007,
            Kind::Pending => -32008,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unauthorized => "unauthorized",
            Kind::ParseError => "parse_error",
            Kind::InvalidRequest => "invalid_request",
            Kind::MethodNotFound => "method_not_found",
            Kind::InvalidParams => "invalid_params",
            Kind::Internal => "internal",
            Kind::Forbidden => "forbidden",
            Kind::Denied => "denied",
            Kind::RateLimited => "rate_limited",
            Kind::TooLarge => "too_large",
            Kind::Unavailable => "unavailable",
            Kind::Busy => "busy",
            Kind::NotFound => "not_found",
            Kind::Pending => "pending",
        }
    }

    /// The status of a REST answer carrying this error.
    pub fn http_status(self) -> u16 {
        match self {
            Kind::Unauthorized => 401,
            Kind::ParseError | Kind::InvalidRequest | Kind::InvalidParams => 400,
            Kind::MethodNotFound | Kind::NotFound => 404,
            Kind::Internal => 500,
            Kind::Forbidden | Kind::Denied => 403,
            Kind::RateLimited => 429,
            Kind::TooLarge => 413,
            Kind::Unavailable | Kind::Busy => 503,
            Kind::Pending => 408,
        }
    }
}

/// An error answer. `message` is for people; it never carries a token or a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub kind: Kind,
    pub message: String,
    /// Extra fields of `error.data` besides `kind`.
    pub data: Map<String, Value>,
}

impl RpcError {
    pub fn new(kind: Kind, message: impl Into<String>) -> RpcError {
        RpcError {
            kind,
            message: message.into(),
            data: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: Value) -> RpcError {
        self.data.insert(key.to_string(), value);
        self
    }

    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(Kind::InvalidParams, message)
    }

    pub fn internal(message: impl Into<String>) -> RpcError {
        RpcError::new(Kind::Internal, message)
    }

    /// A broker refusal or failure, mapped to the client's error table; `data.broker` names
    /// the broker's code.
    pub fn from_broker(e: &carapace_broker::client::ClientError) -> RpcError {
        let Some(code) = e.code() else {
            return RpcError::new(Kind::Unavailable, format!("the broker failed: {e}"));
        };
        let kind = match code {
            BrokerCode::Denied => Kind::Denied,
            BrokerCode::NotFound => Kind::NotFound,
            BrokerCode::RateLimited => Kind::RateLimited,
            BrokerCode::Pending => Kind::Pending,
            BrokerCode::Busy => Kind::Busy,
            BrokerCode::TooLarge => Kind::TooLarge,
            BrokerCode::BadRequest | BrokerCode::UnknownOp | BrokerCode::UnsupportedVersion => {
                Kind::InvalidParams
            }
            BrokerCode::Unavailable | BrokerCode::Internal | BrokerCode::Unknown => {
                Kind::Unavailable
            }
        };
        let message = match e {
            carapace_broker::client::ClientError::Refused(b) => b.message.clone(),
            other => other.to_string(),
        };
        RpcError::new(kind, message).with("broker", json!(code.as_str()))
    }

    /// `{"code":..,"message":..,"data":{"kind":..,...}}`.
    pub fn to_json(&self) -> Value {
        let mut data = self.data.clone();
        data.insert("kind".into(), json!(self.kind.as_str()));
        json!({"code": self.kind.code(), "message": self.message, "data": data})
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for RpcError {}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The client's id: a string or an integer, echoed as given.
    pub id: Value,
    pub method: String,
    /// Always an object (absent params read as `{}`).
    pub params: Value,
}

/// Decode one request. On failure, the id to answer with (Null when it could not be read)
/// and the error.
pub fn decode(text: &str) -> Result<Call, (Value, RpcError)> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        (
            Value::Null,
            RpcError::new(Kind::ParseError, format!("not JSON: {e}")),
        )
    })?;
    decode_value(v)
}

/// [`decode`] of an already parsed value.
pub fn decode_value(v: Value) -> Result<Call, (Value, RpcError)> {
    let Value::Object(mut o) = v else {
        let what = if v.is_array() {
            "batches (arrays) are not supported: send one request per frame"
        } else {
            "a request is a JSON object"
        };
        return Err((Value::Null, RpcError::new(Kind::InvalidRequest, what)));
    };
    let id = match o.remove("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) if is_valid_id(&id) => id,
        Some(_) => {
            return Err((
                Value::Null,
                RpcError::new(
                    Kind::InvalidRequest,
                    "`id` must be a string (at most 128 bytes) or an integer",
                ),
            ))
        }
        None => {
            return Err((
                Value::Null,
                RpcError::new(
                    Kind::InvalidRequest,
                    "a request needs an `id` (notifications are not accepted: every method has a result)",
                ),
            ))
        }
    };
    let fail = |m: &str| Err((id.clone(), RpcError::new(Kind::InvalidRequest, m)));
    match o.remove("jsonrpc") {
        Some(Value::String(s)) if s == "2.0" => {}
        _ => return fail("`jsonrpc` must be \"2.0\""),
    }
    let method = match o.remove("method") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 64 => m,
        _ => return fail("`method` must be a non-empty string (at most 64 bytes)"),
    };
    let params = match o.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err((id, RpcError::invalid_params("`params` must be an object"))),
    };
    if let Some(k) = o.keys().next() {
        return fail(&format!("unknown key `{}` in the request", shown(k)));
    }
    Ok(Call { id, method, params })
}

fn is_valid_id(id: &Value) -> bool {
    match id {
        Value::String(s) => s.len() <= 128,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

/// A response frame.
pub fn response(id: &Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_json()}),
    }
}

/// An event (notification) frame.
pub fn event(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params})
}

/// Deserialize a method's params strictly (the param structs deny unknown fields).
pub fn params<T: serde::de::DeserializeOwned>(p: Value) -> Result<T, RpcError> {
    serde_json::from_value(p).map_err(|e| RpcError::invalid_params(e.to_string()))
}

/// A bounded, printable rendering of client text for messages.
pub fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(text: &str) -> (Value, Kind) {
        match decode(text) {
            Ok(c) => panic!("accepted {text}: {c:?}"),
            Err((id, e)) => (id, e.kind),
        }
    }

    #[test]
    fn good_requests() {
        let c = decode(r#"{"jsonrpc":"2.0","id":7,"method":"gateway.ping"}"#)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
        assert_eq!((c.id, c.method.as_str()), (json!(7), "gateway.ping"));
        assert_eq!(c.params, json!({}));
        let c = decode(r#"{"jsonrpc":"2.0","id":"a","method":"m","params":{"x":1}}"#)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
        assert_eq!((c.id, c.params), (json!("a"), json!({"x":1})));
    }

    #[test]
    fn bad_requests_get_the_right_error_and_id() {
        assert_eq!(kind_of("{"), (Value::Null, Kind::ParseError));
        assert_eq!(kind_of("[]"), (Value::Null, Kind::InvalidRequest));
        assert_eq!(kind_of("3"), (Value::Null, Kind::InvalidRequest));
        assert_eq!(
            kind_of(r#"{"jsonrpc":"2.0","method":"m"}"#),
            (Value::Null, Kind::InvalidRequest)
        );
        assert_eq!(
            kind_of(r#"{"jsonrpc":"2.0","id":1.5,"method":"m"}"#),
            (Value::Null, Kind::InvalidRequest)
        );
        assert_eq!(
            kind_of(r#"{"jsonrpc":"2.0","id":{},"method":"m"}"#),
            (Value::Null, Kind::InvalidRequest)
        );
        assert_eq!(
            kind_of(r#"{"jsonrpc":"1.0","id":1,"method":"m"}"#),
            (json!(1), Kind::InvalidRequest)
        );
        assert_eq!(
            kind_of(r#"{"jsonrpc":"2.0","id":1,"method":5}"#),
            (json!(1), Kind::InvalidRequest)
        );
        assert_eq!(
            kind_of(r#"{"jsonrpc":"2.0","id":1,"method":"m","params":[1]}"#),
            (json!(1), Kind::InvalidParams)
        );
        assert_eq!(
            kind_of(r#"{"jsonrpc":"2.0","id":1,"method":"m","extra":true}"#),
            (json!(1), Kind::InvalidRequest)
        );
        let long = format!(
            r#"{{"jsonrpc":"2.0","id":"{}","method":"m"}}"#,
            "x".repeat(200)
        );
        assert_eq!(kind_of(&long).1, Kind::InvalidRequest);
    }

    #[test]
    fn frames() {
        assert_eq!(
            response(&json!(1), Ok(json!({"a":1}))),
            json!({"jsonrpc":"2.0","id":1,"result":{"a":1}})
        );
        let e = RpcError::new(Kind::Denied, "no").with("broker", json!("denied"));
        assert_eq!(
            response(&json!("x"), Err(e)),
            json!({"jsonrpc":"2.0","id":"x","error":{"code":-32002,"message":"no","data":{"kind":"denied","broker":"denied"}}})
        );
        assert_eq!(
            event("tools.output", json!({"call":1})),
            json!({"jsonrpc":"2.0","method":"tools.output","params":{"call":1}})
        );
    }

    #[test]
    fn every_kind_has_a_distinct_code() {
        let all = [
            Kind::Unauthorized,
            Kind::ParseError,
            Kind::InvalidRequest,
            Kind::MethodNotFound,
            Kind::InvalidParams,
            Kind::Internal,
            Kind::Forbidden,
            Kind::Denied,
            Kind::RateLimited,
            Kind::TooLarge,
            Kind::Unavailable,
            Kind::Busy,
            Kind::NotFound,
            Kind::Pending,
        ];
        let mut codes: Vec<i64> = all.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    #[test]
    fn params_are_strict() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            #[allow(dead_code)]
            a: u8,
        }
        assert!(params::<P>(json!({"a":1})).is_ok());
        assert_eq!(
            params::<P>(json!({"a":1,"b":2})).map_err(|e| e.kind).err(),
            Some(Kind::InvalidParams)
        );
        assert!(params::<P>(json!({"a":300})).is_err());
    }
}
