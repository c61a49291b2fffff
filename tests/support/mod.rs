//! Test support: the loopback issuer and the daemon harness.
#![allow(dead_code, unreachable_pub)]

pub mod daemon;
pub mod issuer;
