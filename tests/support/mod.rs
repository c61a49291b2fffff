//! Test support: the loopback issuer, the oidc-provider server, the
//! daemon harness, its systemd counterpart, and containers booting a real
//! systemd.
#![allow(dead_code, unreachable_pub)]

pub mod cli;
pub mod daemon;
pub mod foreign;
pub mod issuer;
pub mod nspawn;
pub mod oidc;
pub mod systemd;

/// Ends a child a harness owns: kills and reaps it, and when the test is
/// failing prints what it said (`name` and `output`), the one place a
/// failure shows the peer's side.
pub fn reap(child: Option<std::process::Child>, name: &str, output: impl FnOnce() -> String) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
    if std::thread::panicking() {
        eprintln!(
            "---- {name} ----\n{}\n---- end of {name} ----",
            output().trim_end()
        );
    }
}
