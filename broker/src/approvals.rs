//! approvals (being written).
