//! Shared support for the integration tests: the loopback authorization
//! server ([`issuer`]). Each test crate uses a different subset of the
//! helpers, so unused ones must not warn.
#![allow(dead_code, unreachable_pub)]

pub mod issuer;
