//! carapace supervisor library.
