//! Runs the real `oidc-provider` interop server (`tests/oidc/server.mjs`).
//!
//! [`OidcProvider::start`] spawns `node server.mjs 0` with its stdin piped
//! and held: the server exits when that pipe closes, so it dies with the
//! test even if the test process is killed. Readiness is its one stdout
//! line, `READY http://127.0.0.1:PORT`, read on a thread and awaited with a
//! timeout (an event, not a sleep). Its stderr is collected; on drop the
//! server is killed and, if the test is failing, its stderr is printed.
//! Clients and their secrets are listed in `tests/oidc/README.md`.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};

use super::daemon::PATIENCE;

pub struct OidcProvider {
    child: Option<Child>,
    issuer: String,
    stderr: Arc<Mutex<String>>,
}

impl OidcProvider {
    /// Starts the server on a free loopback port and waits until it listens.
    pub fn start() -> OidcProvider {
        OidcProvider::start_with_env(&[])
    }

    /// Like [`OidcProvider::start`], with more environment for the server
    /// (`PKJWT_*_PUBLIC_KEY` registers the `private_key_jwt` clients;
    /// `MTLS_*` makes it speak HTTPS and registers the mTLS clients).
    pub fn start_with_env(env: &[(&str, &str)]) -> OidcProvider {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        assert!(
            dir.join("node_modules").is_dir(),
            "{} is missing: run scripts/test (it runs npm ci in tests/oidc)",
            dir.join("node_modules").display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .arg("0")
            .current_dir(&dir)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start node for the oidc server: {e}"));

        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                let text = String::from_utf8_lossy(&chunk[..n]);
                sink.lock().expect("stderr lock").push_str(&text);
            }
        });

        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = ready_tx.send(read);
        });

        let mut provider = OidcProvider {
            child: Some(child),
            issuer: String::new(),
            stderr,
        };
        let line = match ready_rx.recv_timeout(PATIENCE) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => provider.fail(&format!("reading its stdout failed: {e}")),
            Err(_) => provider.fail(&format!("no READY line within {PATIENCE:?}")),
        };
        match line.trim_end().strip_prefix("READY ") {
            Some(url)
                if url.starts_with("http://127.0.0.1:")
                    || url.starts_with("https://127.0.0.1:") =>
            {
                provider.issuer = url.to_owned()
            }
            _ => provider.fail(&format!(
                "expected `READY http(s)://127.0.0.1:PORT`, got {line:?}"
            )),
        }
        provider
    }

    /// Kills the server and panics with `why` and its stderr.
    fn fail(&mut self, why: &str) -> ! {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "the oidc server did not start: {why}; its stderr:\n{}",
            self.stderr()
        );
    }

    /// `http://127.0.0.1:PORT` (`https://` with `MTLS_*`), the issuer
    /// identifier.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        super::reap(self.child.take(), "oidc server stderr", || self.stderr());
    }
}
