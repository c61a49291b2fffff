//! Boots a Debian root with systemd as PID 1 under `systemd-nspawn`, for
//! tests/real_systemd.rs, and runs commands inside it.
//!
//! [`Container`] owns one booted container: the `systemd-nspawn` process,
//! the console output it collects, and the host pid of the container's
//! PID 1. [`Container::boot`] returns once systemd reports the boot done;
//! [`Container::sh`] runs a shell script as root in all the container's
//! namespaces (`nsenter`), [`Container::run_as`] as a real process of the
//! container under another user (`systemd-run`, so that user's groups and
//! a fresh session apply). [`Container::poweroff`] shuts it down the way a
//! host would; dropping a container that is still up does the same, then
//! kills what is left, so a failing test never leaves one running.
//!
//! It does not own the root (`scripts/nspawn-root` builds and caches it;
//! the boot is `--volatile=overlay`, so the root is never written), what is
//! installed in it, or what the checks assert.
#![allow(dead_code, unreachable_pub)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cli::Ran;

/// How long booting may take: systemd in a minimal root is up in well
/// under a second, but a busy machine can stretch that.
const BOOT_PATIENCE: Duration = Duration::from_secs(60);

/// How long one command inside may take before it is killed: the longest
/// is `dpkg -i` starting the units, a few seconds.
const COMMAND_PATIENCE: Duration = Duration::from_secs(120);

/// How long the container may take to power off before it is killed.
const POWEROFF_PATIENCE: Duration = Duration::from_secs(30);

/// The environment commands inside start with: the host test's own
/// (cargo's variables, RUST_LOG, a pager) does not belong in there.
const ENV: [(&str, &str); 5] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
    ("SYSTEMD_PAGER", ""),
    ("SYSTEMD_COLORS", "0"),
];

/// Held by the container that is up: nspawn without a host systemd puts
/// every container in the same cgroup, so two at once would collide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// One booted container.
pub struct Container {
    nspawn: Option<Child>,
    /// The host pid of the container's PID 1 (systemd).
    leader: i32,
    console: Arc<Mutex<String>>,
    _turn: MutexGuard<'static, ()>,
}

impl Container {
    /// Boots `root` with `share` bound at `/share` and waits until systemd
    /// has finished starting up. An `Err` says why it could not boot, with
    /// nspawn's output; a boot that ends `degraded` is up, and the failed
    /// units are printed.
    pub fn boot(root: &Path, share: &Path) -> Result<Container, String> {
        // A container that a panicking test dropped is powered off already.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut command = Command::new("systemd-nspawn");
        command
            // A host without systemd has a hybrid or v1 cgroup tree; the
            // container's systemd gets a unified one of its own.
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .arg("--directory")
            .arg(root)
            .args([
                "--boot",
                "--console=pipe",
                // No machined and no system bus on the host to register
                // with, and no host systemd to make a scope unit.
                "--register=no",
                "--keep-unit",
                // A tmpfs over the root: the cached root stays pristine.
                "--volatile=overlay",
                // Without it nspawn's seccomp stays in the way of the BPF
                // programs that DevicePolicy= and IPAddressDeny= load, and
                // systemd skips them silently.
                "--system-call-filter=bpf",
            ])
            .arg(format!("--bind={}:/share", share.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut nspawn = command
            .spawn()
            .map_err(|e| format!("failed to start systemd-nspawn: {e}"))?;
        let console = Arc::new(Mutex::new(String::new()));
        for pipe in [
            nspawn
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            nspawn
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            collect(pipe, console.clone());
        }
        let mut container = Container {
            nspawn: Some(nspawn),
            leader: 0,
            console,
            _turn: turn,
        };
        let deadline = Instant::now() + BOOT_PATIENCE;
        container.leader = container.find_leader(deadline)?;
        container.wait_for_boot(deadline)?;
        Ok(container)
    }

    /// The container's PID 1 as seen from the host: nspawn's child whose
    /// pid in its own namespace is 1.
    fn find_leader(&mut self, deadline: Instant) -> Result<i32, String> {
        let nspawn = self.nspawn.as_mut().expect("nspawn runs until poweroff");
        let parent = nspawn.id().to_string();
        loop {
            if let Some(status) = nspawn.try_wait().ok().flatten() {
                return Err(format!(
                    "systemd-nspawn exited ({status}) before the container started:\n{}",
                    self.console()
                ));
            }
            if let Some(pid) = children_in_new_pid_namespace(&parent) {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no container PID 1 within {BOOT_PATIENCE:?}:\n{}",
                    self.console()
                ));
            }
            // The fork takes milliseconds; nothing to wait on but /proc.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `systemctl is-system-running --wait` inside, retried until systemd
    /// listens on its private socket (before that it answers nothing).
    fn wait_for_boot(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            let ran = self.sh("systemctl is-system-running --wait");
            let state = ran.stdout.trim();
            match state {
                "running" => return Ok(()),
                "degraded" => {
                    let failed = self.sh("systemctl --failed --no-legend --plain");
                    eprintln!(
                        "nspawn: booted degraded; failed units:\n{}",
                        failed.stdout.trim_end()
                    );
                    return Ok(());
                }
                // "offline" is also what it says before systemd has
                // created /run/systemd/system: wait on.
                "maintenance" | "stopping" => {
                    return Err(format!(
                        "the container's systemd is {state}:\n{}",
                        self.console()
                    ))
                }
                _ => {}
            }
            let exited = self
                .nspawn
                .as_mut()
                .and_then(|n| n.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "systemd-nspawn exited ({status}) while booting:\n{}",
                    self.console()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the container did not finish booting within {BOOT_PATIENCE:?} \
                     (last: {ran:?}):\n{}",
                    self.console()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What nspawn and the container's console printed so far.
    pub fn console(&self) -> String {
        self.console.lock().expect("console lock").clone()
    }

    /// The host pid of the container's PID 1.
    pub fn leader(&self) -> i32 {
        self.leader
    }

    /// Runs `script` with `sh -c` as root inside the container.
    pub fn sh(&self, script: &str) -> Ran {
        self.nsenter(&["/bin/sh", "-c", script])
    }

    /// Runs `script` with `sh -c` as `user`, as a transient service of the
    /// container's systemd: the user's groups as systemd computes them,
    /// and the exit status of the script as its own.
    pub fn run_as(&self, user: &str, script: &str) -> Ran {
        let user = format!("User={user}");
        self.nsenter(&[
            "systemd-run",
            "--quiet",
            "--wait",
            "--pipe",
            "--collect",
            "--property",
            &user,
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
    }

    /// `journalctl -u UNIT` for each of `units`, everything so far, after
    /// making sure journald has stored what it was sent.
    pub fn journal(&self, units: &[&str]) -> String {
        self.journal_after(units, None)
    }

    /// A journal position: [`Container::journal_after`] shows what comes
    /// after it.
    pub fn journal_cursor(&self) -> String {
        let ran = self.sh("journalctl --sync && journalctl --lines=0 --show-cursor --quiet");
        ran.stdout
            .lines()
            .find_map(|l| l.strip_prefix("-- cursor: "))
            .unwrap_or_default()
            .to_owned()
    }

    /// Like [`Container::journal`], from `cursor` on.
    pub fn journal_after(&self, units: &[&str], cursor: Option<&str>) -> String {
        let mut script =
            String::from("journalctl --sync; journalctl --no-pager --quiet -o short-precise");
        for unit in units {
            script.push_str(&format!(" -u '{unit}'"));
        }
        if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
            script.push_str(&format!(" --after-cursor='{cursor}'"));
        }
        let ran = self.sh(&script);
        format!("{}{}", ran.stdout, ran.stderr)
    }

    /// Asks the container's systemd to power off (SIGRTMIN+4, as
    /// `systemctl poweroff` from the host would) and waits for nspawn to
    /// exit; kills the container if it takes longer than
    /// [`POWEROFF_PATIENCE`].
    pub fn poweroff(mut self) -> Result<(), String> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), String> {
        let Some(mut nspawn) = self.nspawn.take() else {
            return Ok(());
        };
        if self.leader <= 0 {
            // The boot failed before PID 1 was found; it may be there now.
            self.leader = children_in_new_pid_namespace(&nspawn.id().to_string()).unwrap_or(0);
        }
        if self.leader <= 0 {
            // Nothing to signal (and kill(0, …) would hit our own group).
            let _ = nspawn.kill();
            let _ = nspawn.wait();
            return Ok(());
        }
        let deadline = Instant::now() + POWEROFF_PATIENCE;
        let mut asked = None;
        loop {
            // Sent again each second: systemd ignores it until it has set
            // up its handlers, early in a boot a failing test may cut short.
            if asked.map_or(true, |at: Instant| at.elapsed() >= Duration::from_secs(1)) {
                // SAFETY: kill(2) on the container's PID 1, which nspawn
                // (our child, not yet reaped) keeps alive, so the pid is
                // not reused.
                unsafe { libc::kill(self.leader, libc::SIGRTMIN() + 4) };
                asked = Some(Instant::now());
            }
            match nspawn.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "systemd-nspawn exited with {status} on poweroff:\n{}",
                        self.console()
                    ))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => break,
            }
        }
        // Killing the PID 1 of a pid namespace kills everything in it;
        // killing nspawn alone would leave the container running.
        // SAFETY: as above.
        unsafe { libc::kill(self.leader, libc::SIGKILL) };
        let _ = nspawn.kill();
        let _ = nspawn.wait();
        Err(format!(
            "the container did not power off within {POWEROFF_PATIENCE:?} and was killed:\n{}",
            self.console()
        ))
    }

    fn nsenter(&self, argv: &[&str]) -> Ran {
        let leader = self.leader.to_string();
        // timeout(1) signals the whole process group, which includes what
        // nsenter forked inside the container.
        let mut command = Command::new("timeout");
        command
            .arg("--kill-after=5s")
            .arg(format!("{}s", COMMAND_PATIENCE.as_secs()))
            .args(["nsenter", "--target", &leader, "--all", "--"])
            .args(argv)
            .env_clear()
            .envs(ENV)
            .stdin(Stdio::null());
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("failed to run nsenter: {e}"));
        Ran {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!("nspawn: {e}");
        }
        if std::thread::panicking() {
            eprintln!(
                "---- container console ----\n{}\n---- end of container console ----",
                self.console().trim_end()
            );
        }
    }
}

/// Appends what `pipe` yields to `sink`, on a thread of its own.
fn collect(mut pipe: Box<dyn Read + Send>, sink: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]);
            sink.lock().expect("console lock").push_str(&text);
        }
    });
}

/// The pid of a child of `parent` that is PID 1 in a pid namespace of its
/// own (`NSpid:` ends in 1), if there is one yet.
fn children_in_new_pid_namespace(parent: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let nspid: Vec<&str> = field("NSpid:")?.split_whitespace().collect();
        (field("PPid:")? == parent && nspid.len() > 1 && nspid.last() == Some(&"1")).then_some(pid)
    })
}
