//! Test support: the loopback issuer, the oidc-provider server and the
//! daemon harness.
#![allow(dead_code, unreachable_pub)]

pub mod cli;
pub mod daemon;
pub mod issuer;
pub mod oidc;
