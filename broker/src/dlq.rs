//! dlq (being written).
