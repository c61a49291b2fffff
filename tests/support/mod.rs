//! Test support: the loopback issuer (over TLS with a test CA too), the
//! oidc-provider server, the daemon harness (plain or as systemd runs it,
//! with systemd's stand-ins), a stand-in daemon that lies to the CLI, the
//! key builder, a CONNECT proxy, containers booting a real systemd, and a
//! tracer that holds a child at a system call.
#![allow(dead_code, unreachable_pub)]

pub mod cli;
pub mod daemon;
pub mod fake_daemon;
pub mod foreign;
pub mod issuer;
pub mod keys;
pub mod nspawn;
pub mod oidc;
pub mod proxy;
pub mod systemd;
pub mod tls;
pub mod trace;

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

/// Builds the Debian package from the binary this test run built into
/// `dir` and returns its path. The dev profile: a release build would take
/// minutes, and cargo-deb accepts it with a warning.
pub fn build_deb(dir: &std::path::Path) -> std::path::PathBuf {
    let out = std::process::Command::new("cargo")
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "--output",
        ])
        .arg(dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo deb (scripts/test installs cargo-deb)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cargo deb failed:\n{text}");
    std::fs::read_dir(dir)
        .expect("read output")
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("no .deb in cargo deb's output:\n{text}"))
}
