//! The gateway's library: what the `carapace-gateway` binary is built from (issue 5 grows it
//! into the agent; for now the binary is the stand-in of `carapace run`).
