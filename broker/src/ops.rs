//! Broker operations: connect, open, secret, send, exec (being written).
