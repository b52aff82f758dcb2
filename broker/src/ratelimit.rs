//! ratelimit (being written).
