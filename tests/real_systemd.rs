//! tokend's Debian package under a real systemd, checked from outside as
//! an operator would: Debian 12 (bookworm, systemd 252), then Debian 13
//! (trixie, systemd 257), each booted with systemd as PID 1 under
//! `systemd-nspawn` (tests/support/nspawn.rs) from a root that
//! `scripts/nspawn-root` builds and caches.
//!
//! One test, so the two releases run one after the other (nspawn without a
//! host systemd puts every container in the same cgroup). For each release
//! the package built from this tree is installed, configured the way
//! tokend(8) recommends (the secret as a systemd credential) against the
//! loopback issuer the test runs on the host (the container shares the
//! host's network), and put through the checks below; each prints one line,
//! `real-systemd SUITE: CHECK ... ok` or `... FAILED` with the reason, and a
//! failing check does not stop the others. The test fails at the end with
//! every failure listed. Secrets and tokens are never printed: answers and
//! journals shown on failure carry fingerprints in their place.
//!
//! Where containers cannot boot (not root, no systemd-nspawn, no
//! CAP_SYS_ADMIN, no root could be built) the test prints
//! `real-systemd: skipped: REASON` and passes, unless `CI=true`, where
//! that is a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cli::Ran;
use support::daemon::{fingerprint, Answer};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::nspawn::Container;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SUITES: [&str; 2] = ["bookworm", "trixie"];

const PAYMENTS_SECRET: &str = "real-systemd-payments-secret-3170";
const CARDS_SECRET: &str = "real-systemd-cards-secret-8825";
/// A secret the issuer rejects, for a key that makes tokend unhealthy.
const WRONG_SECRET: &str = "real-systemd-wrong-secret-6041";
/// Its file.
const WRONG_SECRET_FILE: &str = "/etc/tokend/wrong.secret";

const UNITS: [&str; 2] = ["tokend.service", "tokend.socket"];
const CONFIG: &str = "/etc/tokend/tokend.toml";
const SOCKET: &str = "/run/tokend/tokend.sock";
/// Where the operator keeps the payments secret for `LoadCredential=`.
const CREDENTIAL: &str = "/etc/tokend/credentials/payments";
/// A plain secret file, for the key a reload adds: a credential only
/// changes when the service starts.
const CARDS_SECRET_FILE: &str = "/etc/tokend/cards.secret";
const WATCHDOG_DROP_IN: &str = "/etc/systemd/system/tokend.service.d/test-watchdog.conf";
/// The drop-in README suggests to operators who want callers' `comm`.
const PROC_DROP_IN: &str = "/etc/systemd/system/tokend.service.d/test-protectproc.conf";

/// The watchdog interval the watchdog check lowers `WatchdogSec=` to.
const WATCHDOG_SEC: u64 = 4;
/// What `systemd-analyze security` may rate the running service at most.
const EXPOSURE_LIMIT: f64 = 1.2;
/// How long a state the checks wait for may take to arrive.
const PATIENCE: Duration = Duration::from_secs(30);

/// A check's outcome: a note for its line, or why it failed.
type Outcome = Result<String, String>;

/// Returns early from a check with the formatted reason unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            return Err(format!($($reason)+));
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_systemd_bookworm_then_trixie() {
    // In CI the machine is set up for this: not booting is a failure there.
    let strict = std::env::var("CI").is_ok_and(|v| v == "true");
    let mut failures: Vec<String> = Vec::new();
    if let Some(reason) = cannot_boot_here() {
        unable(strict, &mut failures, reason);
        assert!(failures.is_empty(), "real-systemd: {failures:?}");
        return;
    }

    let issuer = Issuer::start(vec![
        ClientSpec::checkout("payments", PAYMENTS_SECRET, &[]),
        ClientSpec::checkout("cards", CARDS_SECRET, &[]),
    ])
    .await;
    let debs = tempfile::tempdir().expect("dir");
    let deb = support::build_deb(debs.path());

    let mut ran = Vec::new();
    for suite in SUITES {
        let root = match nspawn_root(suite) {
            Ok(root) => root,
            Err(reason) => {
                unable(strict, &mut failures, format!("{suite}: {reason}"));
                continue;
            }
        };
        let share = tempfile::tempdir().expect("dir");
        std::fs::copy(&deb, share.path().join("tokend.deb")).expect("copy the .deb");
        let booted = Instant::now();
        let container = match Container::boot(&root, share.path()) {
            Ok(container) => container,
            Err(reason) => {
                unable(strict, &mut failures, format!("{suite}: {reason}"));
                continue;
            }
        };
        eprintln!(
            "real-systemd {suite}: booted {} in {:.1} s",
            root.display(),
            booted.elapsed().as_secs_f64()
        );
        let mut release = Release {
            suite,
            container: &container,
            share: share.path(),
            issuer: &issuer,
            failures: Vec::new(),
        };
        release.run_checks();
        let Release {
            failures: found, ..
        } = release;
        if !found.is_empty() {
            let journal = container.journal(&UNITS);
            eprintln!(
                "---- {suite}: journalctl -u tokend.service -u tokend.socket ----\n{}\
                 ---- end of {suite}'s journal ----",
                redact(&journal, &issuer)
            );
        }
        if let Err(e) = container.poweroff() {
            failures.push(format!("{suite}: {e}"));
        }
        failures.extend(found.into_iter().map(|f| format!("{suite}: {f}")));
        ran.push(suite);
    }

    eprintln!(
        "real-systemd: {} release(s) checked ({}), {} failure(s)",
        ran.len(),
        ran.join(", "),
        failures.len()
    );
    // The reasons in full are above, under each check's line.
    let listed: Vec<&str> = failures
        .iter()
        .map(|f| f.lines().next().unwrap_or_default())
        .collect();
    assert!(
        failures.is_empty(),
        "real-systemd: {} check(s) failed:\n{}",
        failures.len(),
        listed.join("\n")
    );
}

/// Reports that containers cannot boot: a skip, or with `strict` (CI) a
/// failure.
fn unable(strict: bool, failures: &mut Vec<String>, reason: String) {
    if strict {
        eprintln!("real-systemd: cannot boot (a failure, as CI=true): {reason}");
        failures.push(format!("cannot boot: {reason}"));
    } else {
        eprintln!("real-systemd: skipped: {reason}");
    }
}

/// Why no container can boot on this machine, if so.
fn cannot_boot_here() -> Option<String> {
    if nix::unistd::getuid().as_raw() != 0 {
        return Some("not root (scripts/test runs the tests as root)".into());
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("debootstrap", "debootstrap"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} is missing (apt-get install --no-install-recommends {package})"
            ));
        }
    }
    // CAP_SYS_ADMIN is bit 21 of the effective set.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << 21) == 0 {
        return Some("no CAP_SYS_ADMIN".into());
    }
    if !Path::new("/sys/fs/cgroup").is_dir() {
        return Some("no cgroup file system at /sys/fs/cgroup".into());
    }
    None
}

/// The cached root for `suite`, built by `scripts/nspawn-root` if missing.
fn nspawn_root(suite: &str) -> Result<PathBuf, String> {
    let out = Command::new(Path::new(REPO).join("scripts/nspawn-root"))
        .arg(suite)
        .output()
        .map_err(|e| format!("failed to run scripts/nspawn-root: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if !out.status.success() {
        return Err(format!(
            "scripts/nspawn-root {suite} failed ({}): {}",
            out.status,
            stderr.trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Every string the journal must not hold: the client secrets and every
/// token the issuer handed out so far.
fn secrets(issuer: &Issuer) -> Vec<String> {
    let mut all = vec![
        PAYMENTS_SECRET.to_owned(),
        CARDS_SECRET.to_owned(),
        WRONG_SECRET.to_owned(),
    ];
    all.extend(issuer.issued_tokens());
    all
}

/// `text` with each secret and token replaced by its fingerprint.
fn redact(text: &str, issuer: &Issuer) -> String {
    secrets(issuer)
        .iter()
        .fold(text.to_owned(), |text, secret| {
            text.replace(secret, &format!("[secret {}]", fingerprint(secret)))
        })
}

/// The units in README.md's health-check example: its `ini` block, cut at
/// each `# /etc/systemd/system/NAME` comment into (path, text).
fn readme_health_units(readme: &str) -> Result<Vec<(String, String)>, String> {
    let block = readme
        .split("```ini\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .find(|block| block.contains("tokend-health.timer"))
        .ok_or("README.md has no ini block with tokend-health.timer")?;
    let mut units: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if let Some(path) = line.strip_prefix("# /etc/systemd/system/") {
            units.push((format!("/etc/systemd/system/{path}"), String::new()));
        } else if let Some((_, text)) = units.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    match units.len() {
        2 => Ok(units),
        n => Err(format!(
            "README.md's health-check block holds {n} units, not 2"
        )),
    }
}

/// `ran` if it exited 0, else a reason naming `what`.
fn succeeded(ran: Ran, what: &str) -> Result<Ran, String> {
    if ran.code == Some(0) {
        Ok(ran)
    } else {
        Err(format!("{what} failed: {ran:?}"))
    }
}

/// The value of `name:` in a /proc/PID/status text.
fn status_field<'t>(status: &'t str, name: &str) -> Option<&'t str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `FILE:LINE:COL` for `line` of `file` somewhere in `text`.
fn names_location(text: &str, file: &str, line: usize) -> bool {
    let at = format!("{file}:{line}:");
    text.match_indices(&at).any(|(i, _)| {
        text[i + at.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// One release's run: its container, and the failures found so far.
struct Release<'a> {
    suite: &'static str,
    container: &'a Container,
    share: &'a Path,
    issuer: &'a Issuer,
    failures: Vec<String>,
}

impl<'a> Release<'a> {
    fn run_checks(&mut self) {
        if !self.check("install and enable", Self::install_and_enable) {
            eprintln!(
                "real-systemd {}: the other checks are skipped: the package is not installed",
                self.suite
            );
            return;
        }
        self.check("loadcredential secret", Self::loadcredential_secret);
        self.check("three callers", Self::three_callers);
        self.check("hardening in effect", Self::hardening_in_effect);
        self.check("reload keeping tokens", Self::reload_keeping_tokens);
        self.check(
            "broken reload refused and reported",
            Self::broken_reload_refused,
        );
        self.check("README's health-check timer", Self::health_check_timer);
        self.check("journald fields", Self::journald_fields);
        self.check(
            "metrics endpoint under the unit",
            Self::metrics_endpoint_under_the_unit,
        );
        self.check("audit fields under the unit", Self::audit_fields);
        self.check(
            "audit fields with a ProtectProc=default drop-in",
            Self::audit_fields_with_proc_drop_in,
        );
        self.check("watchdog restart", Self::watchdog_restart);
        self.check(
            "unreadable secret keeps the socket up",
            Self::unreadable_secret_keeps_the_socket_up,
        );
        self.check("stop", Self::stop);
        self.check(
            "socket_group without tokend.socket",
            Self::socket_group_without_socket_unit,
        );
        self.check("purge", Self::purge);
        self.check("no secret or token in the journal", Self::journal_clean);
    }

    /// Runs one check and prints its line; records a failure.
    fn check(&mut self, name: &str, body: fn(&Self) -> Outcome) -> bool {
        let started = Instant::now();
        let outcome = body(self);
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(note) => {
                let note = if note.is_empty() {
                    String::new()
                } else {
                    format!(": {note}")
                };
                eprintln!(
                    "real-systemd {}: {name} ... ok ({took:.1} s){note}",
                    self.suite
                );
                true
            }
            Err(reason) => {
                let reason = redact(&reason, self.issuer);
                eprintln!(
                    "real-systemd {}: {name} ... FAILED ({took:.1} s)\n    {}",
                    self.suite,
                    reason.trim_end().replace('\n', "\n    ")
                );
                self.failures.push(format!("{name}: {reason}"));
                false
            }
        }
    }

    fn sh(&self, script: &str) -> Ran {
        self.container.sh(script)
    }

    /// `script` as root, which must exit 0.
    fn sh_ok(&self, script: &str) -> Result<Ran, String> {
        succeeded(self.sh(script), script)
    }

    /// `systemctl ARGS`, which must exit 0; if it does not, the reason
    /// comes with what the units logged meanwhile (why a start failed is
    /// in the journal, not in systemctl's output).
    fn systemctl(&self, args: &str) -> Result<Ran, String> {
        let cursor = self.container.journal_cursor();
        succeeded(
            self.sh(&format!("systemctl {args}")),
            &format!("systemctl {args}"),
        )
        .map_err(|e| {
            let journal = self.container.journal_after(&UNITS, Some(&cursor));
            format!("{e}\nthe journal meanwhile:\n{journal}")
        })
    }

    /// Restarts tokend.service. These checks restart it more often than
    /// any operator would, and systemd's default start limit (5 starts in
    /// 10 s) is not what they test: its counter is reset first.
    fn restart(&self) -> Result<Ran, String> {
        self.sh_ok("systemctl reset-failed tokend.service")?;
        self.systemctl("restart tokend.service")
    }

    /// Puts `text` at `path` in the container with the mode and owner
    /// given, through the shared directory, so that no secret is ever on
    /// a command line.
    fn install_file(&self, path: &str, text: &str, mode: &str, owner: &str) -> Result<(), String> {
        let staged = self.share.join("staged");
        std::fs::write(&staged, text).map_err(|e| format!("write {}: {e}", staged.display()))?;
        let result = self.sh_ok(&format!(
            "install -m {mode} -o {owner} -g {owner} /share/staged {path}"
        ));
        let _ = std::fs::remove_file(&staged);
        result.map(drop)
    }

    fn write_config(&self, text: &str) -> Result<(), String> {
        self.install_file(CONFIG, text, "0600", "tokend")
    }

    /// The configuration: a `[daemon]` table with `daemon` added, and the
    /// key tables `keys`.
    fn config(&self, daemon: &str, keys: &[String]) -> String {
        format!("[daemon]\nsocket = {SOCKET:?}\n{daemon}\n{}", keys.concat())
    }

    /// Key payments as tokend(8) recommends: its secret is the credential
    /// tokend.service's `LoadCredential=secret:/etc/tokend/credentials`
    /// loads from /etc/tokend/credentials/payments.
    fn payments_key(&self) -> String {
        format!(
            "[keys.payments]\ntoken_url = {:?}\nclient_id = \"payments\"\n\
             client_secret_credential = \"payments\"\nallow_users = [\"alice\"]\n\
             prefetch = [[]]\n\n",
            self.issuer.token_url(Dialect::Checkout)
        )
    }

    /// Key cards, which a reload adds: its secret in a plain file tokend
    /// reads itself.
    fn cards_key(&self) -> String {
        format!(
            "[keys.cards]\ntoken_url = {:?}\nclient_id = \"cards\"\n\
             client_secret_file = {CARDS_SECRET_FILE:?}\nallow_users = [\"alice\"]\n\n",
            self.issuer.token_url(Dialect::Checkout)
        )
    }

    /// `tokend get KEY` as `user`: the token, which must be one the
    /// issuer handed out. Never printed.
    fn token_as(&self, user: &str, key: &str) -> Result<String, String> {
        let ran = succeeded(
            self.container.run_as(user, &format!("tokend get {key}")),
            &format!("tokend get {key} as {user}"),
        )?;
        let token = ran.stdout.trim().to_owned();
        ensure!(
            self.issuer.issued_tokens().contains(&token),
            "tokend get {key} as {user} printed something the issuer never issued ({} bytes)",
            token.len()
        );
        Ok(token)
    }

    /// The raw protocol answer to a get for `key`, asked by `user` through
    /// socat: the socket as any client sees it, without tokend's own.
    fn socat_get(&self, user: &str, key: &str) -> Result<Answer, String> {
        // -t: wait that long for the answer after our side is done sending.
        let ran = self.container.run_as(
            user,
            &format!(
                "echo '{{\"op\":\"get\",\"key\":\"{key}\"}}' | socat -t 30 - UNIX-CONNECT:{SOCKET}"
            ),
        );
        let line = ran.stdout.lines().next().unwrap_or_default();
        serde_json::from_str::<Value>(line)
            .map(Answer)
            .map_err(|e| format!("socat get {key} as {user}: no JSON answer ({e}): {ran:?}"))
    }

    fn main_pid(&self) -> Result<u32, String> {
        let ran = self.sh_ok("systemctl show --property=MainPID --value tokend.service")?;
        match ran.stdout.trim().parse() {
            Ok(0) | Err(_) => Err(format!(
                "tokend.service has no main process: {}",
                self.sh("systemctl status --no-pager --lines=0 tokend.service")
                    .stdout
                    .trim()
            )),
            Ok(pid) => Ok(pid),
        }
    }

    /// `systemctl show` properties of tokend.service, as name=value pairs.
    fn show(&self, properties: &str) -> Result<Vec<(String, String)>, String> {
        let ran = self.sh_ok(&format!(
            "systemctl show --property={properties} tokend.service"
        ))?;
        Ok(ran
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    fn install_and_enable(&self) -> Outcome {
        self.sh_ok("dpkg -i /share/tokend.deb")?;
        let enabled = self.sh("systemctl is-enabled tokend.socket tokend.service");
        ensure!(
            enabled.code == Some(0) && enabled.stdout.split_whitespace().eq(["enabled", "enabled"]),
            "systemctl is-enabled tokend.socket tokend.service: {enabled:?}"
        );
        let user = self.sh_ok("getent passwd tokend")?;
        ensure!(
            user.stdout.starts_with("tokend:"),
            "no tokend user: {user:?}"
        );
        for (path, expected) in [
            (CONFIG, "600 tokend"),
            ("/etc/tokend/credentials", "700 root"),
        ] {
            let shown = self.sh_ok(&format!("stat -c '%a %U' {path}"))?;
            ensure!(
                shown.stdout.trim() == expected,
                "{path} is {}, not {expected}",
                shown.stdout.trim()
            );
        }
        // The operator lets the callers that need the socket connect.
        self.sh_ok("usermod -a -G tokend alice && usermod -a -G tokend bob")?;
        Ok(String::new())
    }

    fn loadcredential_secret(&self) -> Outcome {
        self.install_file(CREDENTIAL, &format!("{PAYMENTS_SECRET}\n"), "0600", "root")?;
        self.write_config(&self.config("", &[self.payments_key()]))?;
        // The package started the service with its example config.
        self.systemctl("stop tokend.service")?;

        let check = format!("tokend check --config {CONFIG}");
        self.sh_ok(&check)
            .map_err(|e| format!("with the service stopped: {e}"))?;
        self.systemctl("start tokend.service")?;
        {
            // systemd 257 hands credentials over as 0440 with an ACL for
            // the service's user, 252 as the user's own 0400: show which.
            let path = "/run/credentials/tokend.service/secret_payments";
            let shown = self.sh(&format!("stat -c '%A %U:%G %n' {path}; getfacl -p {path}"));
            eprintln!(
                "real-systemd {}: {}{}",
                self.suite,
                shown.stdout.trim_end().replace('\n', "\n    "),
                shown.stderr
            );
        }
        let token = self.token_as("alice", "payments")?;
        self.sh_ok(&check)
            .map_err(|e| format!("with the service running: {e}"))?;
        Ok(format!("token {}", fingerprint(&token)))
    }

    fn three_callers(&self) -> Outcome {
        // alice: in group tokend and on the key's allow list.
        let token = self.token_as("alice", "payments")?;
        let answer = self.socat_get("alice", "payments")?;
        ensure!(
            answer["ok"] == true && answer["access_token"].as_str() == Some(token.as_str()),
            "socat as alice got {answer}, tokend get token {}",
            fingerprint(&token)
        );

        // bob: may connect, but is not on the allow list.
        let bob = self.container.run_as("bob", "tokend get payments");
        ensure!(
            bob.code == Some(1) && bob.stdout.is_empty(),
            "tokend get payments as bob should exit 1: {bob:?}"
        );
        let answer = self.socat_get("bob", "payments")?;
        ensure!(
            answer["ok"] == false && answer["error"]["code"] == "forbidden",
            "socat as bob: {answer}"
        );

        // carol: not in group tokend, so the socket's mode keeps her out.
        let carol = self.container.run_as("carol", "tokend get payments");
        ensure!(
            carol.code == Some(3) && carol.stderr.contains("Permission denied"),
            "tokend get payments as carol should exit 3 with permission denied: {carol:?}"
        );
        let socat = self.container.run_as(
            "carol",
            &format!("echo '{{}}' | socat - UNIX-CONNECT:{SOCKET}"),
        );
        ensure!(
            socat.code != Some(0) && socat.stderr.contains("Permission denied"),
            "socat as carol should be refused: {socat:?}"
        );
        Ok(format!(
            "alice token {}, bob forbidden, carol permission denied",
            fingerprint(&token)
        ))
    }

    fn hardening_in_effect(&self) -> Outcome {
        let pid = self.main_pid()?;
        let status = self.sh_ok(&format!("cat /proc/{pid}/status"))?.stdout;
        let init = self.sh_ok("cat /proc/1/status")?.stdout;
        let field = |name: &str| {
            status_field(&status, name).ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
        };

        let tokend_uid = self.sh_ok("id -u tokend")?.stdout.trim().to_owned();
        let uids: Vec<&str> = field("Uid")?.split_whitespace().collect();
        ensure!(
            uids.iter().all(|u| *u == tokend_uid),
            "Uid: {uids:?}, tokend is {tokend_uid}"
        );
        ensure!(
            field("NoNewPrivs")? == "1",
            "NoNewPrivs: {}",
            field("NoNewPrivs")?
        );
        for caps in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
            let value = field(caps)?;
            ensure!(value == "0000000000000000", "{caps}: {value}");
        }
        // Every process here runs under nspawn's own filters; the unit's
        // filter comes on top of those.
        let filters =
            |text: &str| status_field(text, "Seccomp_filters").and_then(|n| n.parse::<u32>().ok());
        let (Some(own), Some(inherited)) = (filters(&status), filters(&init)) else {
            return Err("no Seccomp_filters in /proc/PID/status (kernel older than 5.9?)".into());
        };
        ensure!(
            own > inherited,
            "tokend has {own} seccomp filters, PID 1 {inherited}: the unit's filter is not applied"
        );

        let (score, overall) = self.exposure()?;
        if score > EXPOSURE_LIMIT {
            return Err(format!("{overall}: above {EXPOSURE_LIMIT}"));
        }
        Ok(format!(
            "uid {tokend_uid}, no capabilities, NoNewPrivs, seccomp filters {own} > {inherited}; {overall}"
        ))
    }

    /// `systemd-analyze security`'s rating of tokend.service, as a number
    /// and as its line.
    fn exposure(&self) -> Result<(f64, String), String> {
        let analyze = self.sh_ok("systemd-analyze security --no-pager tokend.service")?;
        let overall = analyze
            .stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .ok_or_else(|| format!("no exposure level: {analyze:?}"))?;
        let score: f64 = overall
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unreadable exposure level: {overall}"))?;
        Ok((score, overall.trim_start_matches('→').trim().to_owned()))
    }

    fn reload_keeping_tokens(&self) -> Outcome {
        let before = self.token_as("alice", "payments")?;
        self.install_file(
            CARDS_SECRET_FILE,
            &format!("{CARDS_SECRET}\n"),
            "0600",
            "tokend",
        )?;
        self.write_config(&self.config("", &[self.payments_key(), self.cards_key()]))?;
        self.systemctl("reload tokend")?;
        let cards = self.token_as("alice", "cards")?;
        let after = self.token_as("alice", "payments")?;
        ensure!(
            after == before,
            "payments' token changed across the reload: {} then {}",
            fingerprint(&before),
            fingerprint(&after)
        );
        Ok(format!(
            "cards served ({}), payments kept {}",
            fingerprint(&cards),
            fingerprint(&after)
        ))
    }

    fn broken_reload_refused(&self) -> Outcome {
        let good = self.config("", &[self.payments_key(), self.cards_key()]);
        let before = self.token_as("alice", "payments")?;
        // A field tokend does not know, on the file's last line.
        let broken = format!("{good}no_such_setting = true\n");
        let line = broken.lines().count();
        self.write_config(&broken)?;
        let cursor = self.container.journal_cursor();
        let reload = self.sh("systemctl reload tokend");
        let journal = self.container.journal_after(&UNITS, Some(&cursor));

        let mut problems = Vec::new();
        if reload.code == Some(0) {
            problems.push("systemctl reload exited 0 on a broken configuration".to_owned());
        }
        let told = format!("{}{}", reload.stdout, reload.stderr);
        if !names_location(&told, CONFIG, line) && !names_location(&journal, CONFIG, line) {
            problems.push(format!(
                "neither systemctl reload's output nor the journal names {CONFIG}:{line}:COL"
            ));
        }
        // The old configuration keeps serving, tokens and all.
        match self.token_as("alice", "payments") {
            Ok(after) if after == before => {}
            Ok(after) => problems.push(format!(
                "payments' token changed: {} then {}",
                fingerprint(&before),
                fingerprint(&after)
            )),
            Err(e) => problems.push(format!("after the refused reload: {e}")),
        }
        if let Err(e) = self.token_as("alice", "cards") {
            problems.push(format!("after the refused reload: {e}"));
        }

        // Fixed again for the checks that follow.
        self.write_config(&good)?;
        if let Err(e) = self.systemctl("reload tokend") {
            problems.push(format!("reloading the fixed configuration: {e}"));
        }
        ensure!(
            problems.is_empty(),
            "{}\nsystemctl reload: {reload:?}\njournal since:\n{journal}",
            problems.join("\n")
        );
        let reason = journal
            .lines()
            .chain(told.lines())
            .find(|l| names_location(l, CONFIG, line))
            .unwrap_or_default();
        Ok(format!("exit {:?}; {}", reload.code, reason.trim()))
    }

    /// The README's health-check units, copied as an operator would: the
    /// check passes while every prefetch set is fresh, and fails, so that
    /// `OnFailure=` pages, once a key's secret is rejected.
    fn health_check_timer(&self) -> Outcome {
        let readme = std::fs::read_to_string(Path::new(REPO).join("README.md"))
            .map_err(|e| format!("read README.md: {e}"))?;
        let units = readme_health_units(&readme)?;
        for (path, text) in &units {
            self.install_file(path, text, "0644", "root")?;
        }
        // What the README's OnFailure= names, standing in for a pager.
        self.install_file(
            "/etc/systemd/system/page-the-operator@.service",
            "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo %i >> /run/paged'\n",
            "0644",
            "root",
        )?;
        self.systemctl("daemon-reload")?;
        self.systemctl("enable --now tokend-health.timer")?;
        self.systemctl("start tokend-health.service")?;

        let good = self.config("", &[self.payments_key(), self.cards_key()]);
        let wrong = format!(
            "[keys.wrong]\ntoken_url = {:?}\nclient_id = \"payments\"\n\
             client_secret_file = {WRONG_SECRET_FILE:?}\nallow_users = [\"alice\"]\n\
             prefetch = [[]]\n\n",
            self.issuer.token_url(Dialect::Checkout)
        );
        self.install_file(
            WRONG_SECRET_FILE,
            &format!("{WRONG_SECRET}\n"),
            "0600",
            "tokend",
        )?;
        self.write_config(&format!("{good}{wrong}"))?;
        self.systemctl("reload tokend")?;
        let started = Instant::now();
        let unhealthy = loop {
            let ran = self.container.run_as("tokend", "tokend status");
            if ran.code == Some(1) || started.elapsed() > PATIENCE {
                break ran;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let failed = self.sh("systemctl start tokend-health.service");
        let paged = loop {
            let paged = self.sh("cat /run/paged 2>/dev/null").stdout;
            if paged.contains("tokend-health") || started.elapsed() > PATIENCE {
                break paged;
            }
            std::thread::sleep(Duration::from_millis(200));
        };

        // Healthy again for the checks that follow.
        self.write_config(&good)?;
        self.systemctl("reload tokend")?;
        self.systemctl("disable --now tokend-health.timer")?;
        // The operator's own files: purge, later, must find only its own.
        let mut paths: Vec<&str> = units.iter().map(|(path, _)| path.as_str()).collect();
        paths.push("/etc/systemd/system/page-the-operator@.service");
        paths.push(WRONG_SECRET_FILE);
        self.sh_ok(&format!("rm -f {}", paths.join(" ")))?;
        self.systemctl("daemon-reload")?;
        ensure!(
            unhealthy.code == Some(1) && unhealthy.stdout.contains("wrong"),
            "tokend status as tokend with a rejected secret: {unhealthy:?}"
        );
        ensure!(
            failed.code != Some(0),
            "systemctl start tokend-health.service passed while key wrong failed: {failed:?}"
        );
        ensure!(
            paged.contains("tokend-health.service"),
            "OnFailure= did not run: /run/paged holds {paged:?}"
        );
        let row = unhealthy
            .stdout
            .lines()
            .find(|l| l.starts_with("wrong"))
            .unwrap_or_default()
            .split_whitespace()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        Ok(format!("healthy: exit 0; then {row:?}, exit 1, paged"))
    }

    fn journald_fields(&self) -> Outcome {
        let ran = self
            .sh_ok("journalctl --sync && journalctl -u tokend KEY=payments -o json --no-pager")?;
        let mut entries = 0;
        for line in ran.stdout.lines().filter(|l| !l.trim().is_empty()) {
            let entry: Value =
                serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
            ensure!(
                entry["KEY"] == "payments",
                "an entry without KEY=payments: {}",
                entry["MESSAGE"]
            );
            entries += 1;
        }
        ensure!(entries > 0, "no journal entry with KEY=payments");
        Ok(format!("{entries} entries with KEY=payments"))
    }

    /// `metrics_listen` under the shipped unit's sandbox: the endpoint
    /// binds and answers a scrape from inside the container, and `tokend
    /// metrics` answers root. The configuration before is put back.
    fn metrics_endpoint_under_the_unit(&self) -> Outcome {
        let before = self.sh_ok(&format!("cat {CONFIG}"))?.stdout;
        let with_metrics = before.replacen(
            "[daemon]\n",
            "[daemon]\nmetrics_listen = \"127.0.0.1:9464\"\nmetrics_allow_uids = [0]\n",
            1,
        );
        ensure!(with_metrics != before, "no [daemon] table in {CONFIG}");
        self.write_config(&with_metrics)?;
        self.restart()?;
        // bash's /dev/tcp: the roots have no HTTP client, and this is a
        // plain HTTP/1.1 request as any scraper sends.
        let scraped = self.sh(
            "bash -c \"exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /metrics HTTP/1.1\\r\\n\
             Host: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && cat <&3\"",
        );
        let op = self.sh("tokend metrics");
        self.write_config(&before)?;
        self.restart()?;
        let status = scraped.stdout.lines().next().unwrap_or_default();
        ensure!(
            status.starts_with("HTTP/1.1 200") && scraped.stdout.contains("tokend_build_info{"),
            "no metrics over HTTP on 127.0.0.1:9464: {scraped:?}"
        );
        ensure!(
            op.code == Some(0) && op.stdout.contains("tokend_build_info{"),
            "tokend metrics as root: {op:?}"
        );
        Ok(format!("{}; tokend metrics exit 0", status.trim()))
    }

    /// The journal entries of tokend.service matching `filter`
    /// (`FIELD=value` words), as JSON.
    fn entries(&self, filter: &str) -> Result<Vec<Value>, String> {
        let ran = self.sh_ok(&format!(
            "journalctl --sync && journalctl -u tokend {filter} -o json --no-pager"
        ))?;
        ran.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON ({e}): {l}")))
            .collect()
    }

    /// What the shipped unit's `ProtectProc=invisible` lets tokend see of
    /// its callers, found with the queries the README shows: alice's
    /// handouts by `PEER_UID=`, reloads by `ASKED_BY=`.
    fn audit_fields(&self) -> Outcome {
        let uid = self.sh_ok("id -u alice")?.stdout.trim().to_owned();
        let gid = self.sh_ok("id -g alice")?.stdout.trim().to_owned();
        let handouts = self.entries(&format!("PEER_UID={uid} MESSAGE='handed out a token'"))?;
        let first = handouts
            .first()
            .ok_or_else(|| format!("no handout to uid {uid} in the journal"))?;
        ensure!(
            first["PEER_GID"] == gid.as_str() && first["PEER_PID"].is_string(),
            "alice's handout: {first}"
        );
        let sighup = self.sh("systemctl kill --signal=SIGHUP --kill-whom=main tokend.service");
        ensure!(sighup.code == Some(0), "SIGHUP: {sighup:?}");
        let deadline = Instant::now() + PATIENCE;
        let signalled = loop {
            if let Some(entry) = self.entries("ASKED_BY=signal")?.pop() {
                break entry;
            }
            ensure!(
                Instant::now() < deadline,
                "no reload entry with ASKED_BY=signal"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let asked = self.entries("ASKED_BY=socket")?;
        let by_socket = asked
            .last()
            .ok_or_else(|| "no reload entry with ASKED_BY=socket".to_owned())?;
        // ProtectProc=invisible: another uid's process is not there for
        // tokend; its own user's `tokend reload` (ExecReload=) is.
        ensure!(
            first["PEER_EXE"] == "?" && first["PEER_COMM"] == "?",
            "alice's handout: {first}"
        );
        let tokend_uid = self.sh_ok("id -u tokend")?.stdout.trim().to_owned();
        ensure!(
            by_socket["PEER_UID"] == tokend_uid.as_str()
                && by_socket["PEER_EXE"] == "/usr/bin/tokend"
                && by_socket["PEER_COMM"] == "tokend"
                && by_socket["OUTCOME"] == "reloaded",
            "systemctl reload: {by_socket}"
        );
        ensure!(signalled["OUTCOME"] == "reloaded", "SIGHUP: {signalled}");
        // Two matches of one field are alternatives (README's query).
        let reloads = self.entries("ASKED_BY=signal ASKED_BY=socket")?;
        ensure!(
            reloads.len() == asked.len() + 1,
            "ASKED_BY=signal ASKED_BY=socket: {} entries, {} by socket and one by SIGHUP",
            reloads.len(),
            asked.len()
        );
        Ok(format!(
            "alice (uid {uid}): PEER_EXE={} PEER_COMM={}; systemctl reload: PEER_UID={} \
             PEER_EXE={} PEER_COMM={}; SIGHUP: OUTCOME={}",
            first["PEER_EXE"],
            first["PEER_COMM"],
            by_socket["PEER_UID"],
            by_socket["PEER_EXE"],
            by_socket["PEER_COMM"],
            signalled["OUTCOME"]
        ))
    }

    /// What an operator gets from the drop-in README describes: callers'
    /// `comm` becomes readable, their `exe` stays `?` (reading another
    /// uid's exe link takes ptrace access), and the rating it costs.
    fn audit_fields_with_proc_drop_in(&self) -> Outcome {
        self.sh_ok("mkdir -p /etc/systemd/system/tokend.service.d")?;
        self.install_file(
            PROC_DROP_IN,
            "[Service]\nProtectProc=default\n",
            "0644",
            "root",
        )?;
        let observed = self.alice_seen_after_restart();
        let exposure = self.exposure();
        self.sh_ok(&format!("rm -f {PROC_DROP_IN}"))?;
        self.sh_ok("systemctl daemon-reload")?;
        self.restart()?;
        let (exe, comm) = observed?;
        let (_, overall) = exposure?;
        ensure!(
            exe == "?" && comm == "socat",
            "alice's socat with ProtectProc=default: PEER_EXE={exe} PEER_COMM={comm}"
        );
        Ok(format!(
            "alice's socat: PEER_EXE={exe} PEER_COMM={comm}; {overall}"
        ))
    }

    /// Restarts tokend under the drop-ins in place, has alice's socat get
    /// a token, and returns the PEER_EXE and PEER_COMM of its handout.
    fn alice_seen_after_restart(&self) -> Result<(String, String), String> {
        self.sh_ok("systemctl daemon-reload")?;
        self.restart()?;
        let answer = self.socat_get("alice", "payments")?;
        ensure!(answer["ok"] == true, "socat as alice: {answer}");
        let uid = self.sh_ok("id -u alice")?.stdout.trim().to_owned();
        let pid = self.main_pid()?;
        let handout = self
            .entries(&format!(
                "_PID={pid} PEER_UID={uid} MESSAGE='handed out a token'"
            ))?
            .pop()
            .ok_or_else(|| format!("no handout to uid {uid} by pid {pid}"))?;
        let text = |name: &str| handout[name].as_str().unwrap_or("(none)").to_owned();
        Ok((text("PEER_EXE"), text("PEER_COMM")))
    }

    fn watchdog_restart(&self) -> Outcome {
        self.sh_ok("mkdir -p /etc/systemd/system/tokend.service.d")?;
        self.install_file(
            WATCHDOG_DROP_IN,
            &format!("[Service]\nWatchdogSec={WATCHDOG_SEC}s\n"),
            "0644",
            "root",
        )?;
        let result = self.watchdog_restart_with_drop_in();
        self.sh_ok(&format!(
            "rm -f {WATCHDOG_DROP_IN} && systemctl daemon-reload"
        ))?;
        result
    }

    fn watchdog_restart_with_drop_in(&self) -> Outcome {
        // Each check starts from a clean slate: a start limit an earlier
        // check ran into would hide this one's outcome.
        self.sh_ok(
            "systemctl daemon-reload && systemctl reset-failed tokend.service tokend.socket",
        )?;
        self.restart()?;
        let shown = self.show("WatchdogUSec")?;
        ensure!(
            shown.iter().any(|(_, v)| v == &format!("{WATCHDOG_SEC}s")),
            "the drop-in did not take: {shown:?}"
        );
        let restarts = |props: &[(String, String)]| {
            props
                .iter()
                .find(|(k, _)| k == "NRestarts")
                .and_then(|(_, v)| v.parse::<u32>().ok())
        };
        let pid = self.main_pid()?;
        let before = restarts(&self.show("NRestarts")?).ok_or("no NRestarts")?;

        self.sh_ok(&format!("kill -STOP {pid}"))?;
        let stopped = Instant::now();
        let deadline = stopped + PATIENCE;
        let (new_pid, after) = loop {
            let props = self.show("MainPID,NRestarts,ActiveState")?;
            let main: u32 = props
                .iter()
                .find(|(k, _)| k == "MainPID")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let count = restarts(&props).unwrap_or(before);
            let active = props
                .iter()
                .any(|(k, v)| k == "ActiveState" && v == "active");
            if main != 0 && main != pid && count > before && active {
                break (main, count);
            }
            ensure!(
                Instant::now() < deadline,
                "no restart within {PATIENCE:?} of SIGSTOP (WatchdogSec={WATCHDOG_SEC}s): {props:?}"
            );
            // systemctl show is the state to watch; it is cheap to ask.
            std::thread::sleep(Duration::from_millis(100));
        };
        let took = stopped.elapsed().as_secs_f64();
        let token = self.token_as("alice", "payments")?;
        Ok(format!(
            "pid {pid} stopped, pid {new_pid} serving after {took:.1} s, NRestarts {before} -> {after}, token {}",
            fingerprint(&token)
        ))
    }

    /// The credential's source is gone when tokend (re)starts: the other
    /// key is still served, the missing one answers `unavailable` with the
    /// reason, and neither unit fails (no restart loop, no start limit).
    fn unreadable_secret_keeps_the_socket_up(&self) -> Outcome {
        let stash = "/root/payments.moved";
        self.sh_ok(&format!("mv /etc/tokend/credentials/payments {stash}"))?;
        let cursor = self.container.journal_cursor();
        let restarted = self.restart();
        let journal = self.container.journal_after(&UNITS, Some(&cursor));
        let cards = self.token_as("alice", "cards");
        let payments = self.container.run_as("alice", "tokend get payments");
        let active = self.sh("systemctl is-active tokend.service tokend.socket");
        // Put back, and restart: credentials are copied at start.
        self.sh_ok(&format!("mv {stash} /etc/tokend/credentials/payments"))?;
        self.restart()?;
        let back = self.token_as("alice", "payments")?;

        restarted?;
        let cards = cards?;
        ensure!(
            active.stdout.split_whitespace().collect::<Vec<_>>() == ["active", "active"],
            "units not active: {}",
            active.stdout.trim()
        );
        ensure!(
            payments.code == Some(1) && payments.stderr.contains("client secret could not be read"),
            "tokend get payments without its secret: {payments:?}"
        );
        ensure!(
            journal.contains("key \"payments\" is unusable until a reload"),
            "the journal does not say which key is unusable:\n{journal}"
        );
        Ok(format!(
            "both units active, cards {}, payments unavailable with the reason, back as {} after a restart",
            fingerprint(&cards),
            fingerprint(&back)
        ))
    }

    fn stop(&self) -> Outcome {
        let pid = self.main_pid()?;
        let cursor = self.container.journal_cursor();
        self.systemctl("stop tokend.service tokend.socket")?;
        let alive = self.sh(&format!("test -d /proc/{pid}"));
        ensure!(alive.code != Some(0), "pid {pid} is still there after stop");
        let left = self.sh("pgrep -u tokend -a");
        ensure!(left.code != Some(0), "tokend's processes remain: {left:?}");
        let shown = self.show("Result,ExecMainCode,ExecMainStatus")?;
        let value = |name: &str| {
            shown
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        // ExecMainCode 1 is CLD_EXITED: the process exited, not killed.
        ensure!(
            value("Result") == "success"
                && value("ExecMainCode") == "1"
                && value("ExecMainStatus") == "0",
            "tokend.service did not exit cleanly: {shown:?}"
        );
        let journal = self.container.journal_after(&UNITS, Some(&cursor));
        ensure!(
            !journal.contains("Failed with result") && !journal.contains("Main process exited"),
            "the journal reports a failure:\n{journal}"
        );
        let socket = self.sh(&format!("test -e {SOCKET}"));
        ensure!(socket.code != Some(0), "{SOCKET} is left after stop");
        let clean = journal
            .lines()
            .find(|l| l.contains("Deactivated successfully") || l.contains("Stopped"))
            .unwrap_or_default();
        Ok(clean
            .split_once(": ")
            .map_or("", |(_, m)| m)
            .trim()
            .to_owned())
    }

    fn socket_group_without_socket_unit(&self) -> Outcome {
        self.sh_ok("systemctl mask --now tokend.socket")?;
        let result = self.socket_group_while_masked();
        let unmask = self.sh_ok("systemctl unmask tokend.socket");
        let note = result?;
        unmask?;
        Ok(note)
    }

    fn socket_group_while_masked(&self) -> Outcome {
        let daemon = "socket_mode = \"0660\"\nsocket_group = \"tokend\"\n";
        self.write_config(&self.config(daemon, &[self.payments_key(), self.cards_key()]))?;
        self.sh_ok("systemctl reset-failed tokend.service")?;
        self.systemctl("start tokend.service")?;
        let socket = self.sh_ok(&format!("stat -c '%A %U %G' {SOCKET}"))?;
        ensure!(
            socket.stdout.trim() == "srw-rw---- tokend tokend",
            "{SOCKET} is {}, not srw-rw---- tokend tokend",
            socket.stdout.trim()
        );
        let answer = self.socat_get("alice", "payments")?;
        ensure!(answer["ok"] == true, "socat as alice: {answer}");
        let token = self.token_as("alice", "payments")?;
        self.systemctl("stop tokend.service")?;
        let left = self.sh(&format!("test -e {SOCKET}"));
        ensure!(left.code != Some(0), "{SOCKET} is left after stop");
        Ok(format!(
            "{}, token {}",
            socket.stdout.trim(),
            fingerprint(&token)
        ))
    }

    fn purge(&self) -> Outcome {
        self.sh_ok("dpkg --purge tokend")?;
        let mut left = Vec::new();
        for path in [
            "/usr/bin/tokend",
            "/usr/lib/systemd/system/tokend.service",
            "/usr/lib/systemd/system/tokend.socket",
            "/etc/systemd/system/multi-user.target.wants/tokend.service",
            "/etc/systemd/system/sockets.target.wants/tokend.socket",
            "/etc/tokend/tokend.toml",
        ] {
            if self.sh(&format!("test -e {path}")).code == Some(0) {
                left.push(path.to_owned());
            }
        }
        // What the operator put there is the operator's: purge leaves their
        // secrets, and only them. Names only: the files are secrets.
        let inside = self
            .sh("find /etc/tokend -type f 2>/dev/null | sort")
            .stdout;
        let operators = format!("{CARDS_SECRET_FILE}\n/etc/tokend/credentials/payments");
        let units = self.sh("systemctl list-unit-files --no-legend 'tokend*'");
        ensure!(
            left.is_empty() && units.stdout.trim().is_empty() && inside.trim() == operators,
            "left after purge: {left:?}\nfiles in /etc/tokend: {}unit files: {}",
            inside,
            units.stdout.trim()
        );
        Ok("the operator's two secret files are kept, nothing else".to_owned())
    }

    fn journal_clean(&self) -> Outcome {
        let journal = self.sh_ok("journalctl --sync && journalctl -o export --no-pager")?;
        let secrets = secrets(self.issuer);
        let found: Vec<String> = secrets
            .iter()
            .filter(|s| journal.stdout.contains(s.as_str()))
            .map(|s| fingerprint(s))
            .collect();
        ensure!(
            found.is_empty(),
            "the journal holds secrets or tokens with fingerprints {found:?}"
        );
        Ok(format!("{} secrets and tokens looked for", secrets.len()))
    }
}
