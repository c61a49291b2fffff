//! Test support: the loopback issuer, the oidc-provider server, the
//! daemon harness and its systemd counterpart.
#![allow(dead_code, unreachable_pub)]

pub mod cli;
pub mod daemon;
pub mod foreign;
pub mod issuer;
pub mod oidc;
pub mod systemd;
