//! Shared helpers for the end-to-end tests and escape suite.
