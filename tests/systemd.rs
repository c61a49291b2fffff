//! tokend under systemd: sd_notify readiness, status, watchdog, reload and
//! stopping over a real datagram socket; socket activation under the real
//! `systemd-socket-activate`; the units through `systemd-analyze`; the man
//! page and example config as shipped; and the Debian package installed
//! with dpkg and purged again (as root, as `scripts/test` runs).

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::daemon::{assert_same_token, write_private, Answer, Conn, Daemon, TOKEND};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, Key};
use support::systemd::field;

const SECRET_A: &str = "systemd-secret-a-5521";
const SECRET_B: &str = "systemd-secret-b-7730";
const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// A `[keys.NAME]` table for `issuer`'s Checkout endpoint.
fn key(name: &str, issuer: &Issuer, client: &str, secret: &str, extra: &str) -> String {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client(client, secret)
        .allow_me()
        .extra(extra)
        .toml()
}

/// Started as systemd starts a notify service with a one-second watchdog
/// (at an abstract `$NOTIFY_SOCKET` or a path), once `READY=1` came.
fn start_notify(keys: &str, abstract_address: bool) -> Daemon {
    let unit = Daemon::builder().keys(keys);
    let unit = if abstract_address {
        unit.notify_abstract()
    } else {
        unit.notify()
    };
    unit.watchdog(Duration::from_secs(1)).start()
}

async fn get(conn: &mut Conn, key: &str) -> Answer {
    conn.call(json!({"op": "get", "key": key})).await
}

fn monotonic_usec() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

// Multi-threaded: the harness blocks a thread while it waits for a
// notification, and the loopback issuer must keep answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_before_prefetch_then_status_watchdog_and_stopping() {
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("a", SECRET_A, &[]),
        ClientSpec::checkout("bad", SECRET_B, &[]),
    ])
    .await;
    // An issuer that accepts and never answers: its prefetch must not
    // hold up READY=1.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!(
        "http://{}/connect/token",
        silent.local_addr().expect("addr")
    );
    let accepted = std::thread::spawn(move || silent.accept().map(|(conn, _)| conn));
    let keys = [
        key("k", &issuer, "a", SECRET_A, ""),
        key("bad", &issuer, "bad", "wrong-secret-1", "prefetch = [[]]"),
        Key::new("slow")
            .url(&silent_url)
            .client("s", SECRET_B)
            .extra("prefetch = [[]]\nrequest_timeout = \"60s\"")
            .toml(),
    ]
    .concat();
    let unit = start_notify(&keys, false);
    let notify = unit.notify();
    let (ready_at, ready) = notify.wait_for(0, "READY=1");
    assert!(
        ready
            .get("STATUS")
            .is_some_and(|s| s.starts_with("3 keys, 0 tokens fresh")),
        "{ready:?}"
    );
    // The silent issuer's request is under way and will stay unanswered.
    let silent_conn = accepted.join().expect("accept thread").expect("accept");

    let mut conn = Conn::open(&unit.socket).await;
    let answer = get(&mut conn, "k").await;
    assert_eq!(answer["ok"], true, "{answer}");

    // Petted at half of WATCHDOG_USEC=1000000, from the first tick on.
    let (first, pet) = notify.wait_for(ready_at, "WATCHDOG=1");
    let (_, next) = notify.wait_for(first + 1, "WATCHDOG=1");
    assert!(pet.at.duration_since(ready.at) < Duration::from_secs(1));
    let gap = next.at.duration_since(pet.at);
    assert!(gap < Duration::from_secs(1), "watchdog every {gap:?}");

    // The status line follows the cache: one token now, one key failing.
    let (_, status) = notify.wait_until(ready_at, "STATUS with a fresh token and a failure", |m| {
        m.get("STATUS")
            .is_some_and(|s| s.starts_with("3 keys, 1 token fresh, 1 failing: bad ("))
    });
    assert!(!status.has("READY=1"), "{status:?}");

    // Hung up on, the prefetch fails at once instead of at the deadline.
    drop((conn, silent_conn));
    unit.stop_and_check_log(&secrets(&[&issuer], &[SECRET_A, SECRET_B]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_new_key_on_an_open_connection_and_keeps_tokens() {
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("a", SECRET_A, &[]),
        ClientSpec::checkout("b", SECRET_B, &[]),
    ])
    .await;
    let key_a = key("a", &issuer, "a", SECRET_A, "");
    // An abstract NOTIFY_SOCKET, as systemd gives services in containers.
    let unit = start_notify(&key_a, true);
    let notify = unit.notify();
    let (ready_at, _) = notify.wait_for(0, "READY=1");
    let mut conn = Conn::open(&unit.socket).await;
    let before = get(&mut conn, "a").await;
    assert_eq!(before["ok"], true, "{before}");
    assert_eq!(get(&mut conn, "b").await["error"]["code"], "unknown_key");

    let key_b = key("b", &issuer, "b", SECRET_B, "");
    unit.rewrite_keys(&format!("{key_a}{key_b}"));
    unit.signal(libc::SIGHUP);
    let (reloading_at, reloading) = notify.wait_for(ready_at + 1, "RELOADING=1");
    let stamp: u64 = reloading
        .get("MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    let now = monotonic_usec();
    assert!(stamp <= now && now - stamp < 60_000_000, "{stamp} vs {now}");
    notify.wait_for(reloading_at + 1, "READY=1");

    // The connection opened before the reload sees the new key...
    let b = get(&mut conn, "b").await;
    assert_eq!(b["ok"], true, "{b}");
    // ...and key a, whose credential did not change, kept its token.
    let after = get(&mut conn, "a").await;
    assert_same_token(
        after.token(),
        before.token(),
        true,
        "key a across the reload",
    );
    let fetched_a = issuer
        .requests()
        .iter()
        .filter(|r| r.client_id() == Some("a"))
        .count();
    assert_eq!(fetched_a, 1, "key a was fetched again after the reload");

    drop(conn);
    unit.stop_and_check_log(&secrets(&[&issuer], &[SECRET_A, SECRET_B]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_a_rotated_secret_file() {
    const OLD: &str = "systemd-rotated-old-1187";
    const NEW: &str = "systemd-rotated-new-9042";
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", NEW, &[])]).await;
    let secret_dir = tempfile::tempdir().expect("dir");
    let secret_file = secret_dir.path().join("c.secret");
    write_private(&secret_file, &format!("{OLD}\n"));
    let keys = Key::new("c")
        .issuer(&issuer, Dialect::Checkout)
        .client_id("c")
        .secret_file(&secret_file)
        .allow_me()
        .toml();
    let unit = start_notify(&keys, false);
    let notify = unit.notify();
    let (ready_at, _) = notify.wait_for(0, "READY=1");
    let mut conn = Conn::open(&unit.socket).await;
    let refused = get(&mut conn, "c").await;
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");

    write_private(&secret_file, &format!("{NEW}\n"));
    unit.signal(libc::SIGHUP);
    let (reloading_at, _) = notify.wait_for(ready_at + 1, "RELOADING=1");
    notify.wait_for(reloading_at + 1, "READY=1");
    let answer = get(&mut conn, "c").await;
    assert_eq!(answer["ok"], true, "{answer}");

    drop(conn);
    unit.stop_and_check_log(&secrets(&[&issuer], &[OLD, NEW]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_on_sighup_keeps_the_old_keys_served() {
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("a", SECRET_A, &[]),
        ClientSpec::checkout("b", SECRET_B, &[]),
    ])
    .await;
    let key_a = key("a", &issuer, "a", SECRET_A, "");
    let mut unit = start_notify(&key_a, false);
    let (ready_at, _) = unit.notify().wait_for(0, "READY=1");
    assert_eq!(unit_get(&unit, "a").await["ok"], true);

    // Key b is fine, but a typo further down breaks the whole file.
    let good = unit.config_text(&format!("{key_a}{}", key("b", &issuer, "b", SECRET_B, "")));
    let broken = format!("{good}min_valid = \"soon\"\n");
    let line = broken.lines().count();
    unit.write_config(&broken);
    unit.signal(libc::SIGHUP);
    let (reloading_at, _) = unit.notify().wait_for(ready_at + 1, "RELOADING=1");
    let (ready_again, ready) = unit.notify().wait_for(reloading_at + 1, "READY=1");
    let at = format!("{}:{line}:", unit.config_path.display());
    assert!(
        ready
            .get("STATUS")
            .is_some_and(|s| s.contains("last reload failed") && s.contains(&at)),
        "{ready:?}"
    );
    let logged = unit.wait_for_log_line("reload failed");
    assert!(logged.contains(&at), "{logged}");

    assert_eq!(unit_get(&unit, "a").await["ok"], true);
    assert_eq!(unit_get(&unit, "b").await["error"]["code"], "unknown_key");

    // Fixed, the next reload takes and clears the failure from the status.
    unit.write_config(&good);
    unit.signal(libc::SIGHUP);
    let (reloading_at, _) = unit.notify().wait_for(ready_again + 1, "RELOADING=1");
    let (_, ready) = unit.notify().wait_for(reloading_at + 1, "READY=1");
    assert!(
        ready
            .get("STATUS")
            .is_some_and(|s| !s.contains("reload failed")),
        "{ready:?}"
    );
    assert_eq!(unit_get(&unit, "b").await["ok"], true);

    unit.stop_and_check_log(&secrets(&[&issuer], &[SECRET_A, SECRET_B]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_applies_without_rust_log_and_a_reload_changes_it() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("a", SECRET_A, &[])]).await;
    let key_a = key("a", &issuer, "a", SECRET_A, "");
    let mut unit = Daemon::builder()
        .daemon_lines("log_level = \"debug\"")
        .keys(&key_a)
        .env_remove("RUST_LOG")
        .notify()
        .watchdog(Duration::from_secs(1))
        .start();
    let (ready_at, _) = unit.notify().wait_for(0, "READY=1");
    assert_eq!(unit_get(&unit, "a").await["ok"], true);
    unit.wait_for_log("connection opened"); // debug
    unit.wait_for_log("handed out a token"); // info

    // At "warn" a handout is not logged; the warning about a socket change
    // (which takes a restart) after it shows the log has caught up.
    unit.rewrite("log_level = \"warn\"", &key_a);
    unit.signal(libc::SIGHUP);
    let (reloading_at, _) = unit.notify().wait_for(ready_at + 1, "RELOADING=1");
    let (ready_at, _) = unit.notify().wait_for(reloading_at + 1, "READY=1");
    assert_eq!(unit_get(&unit, "a").await["ok"], true);
    let moved = unit.dir.path().join("elsewhere.sock");
    unit.write_config(&format!(
        "[daemon]\nsocket = {:?}\nlog_level = \"warn\"\n{key_a}",
        moved.display().to_string()
    ));
    unit.signal(libc::SIGHUP);
    unit.notify().wait_for(ready_at + 1, "RELOADING=1");
    let warning = unit.wait_for_log_line("takes a restart");
    assert!(warning.contains("socket changed"), "{warning}");
    assert_eq!(unit.log().matches("handed out a token").count(), 1);
    assert!(!moved.exists(), "a reload does not move the socket");
    assert_eq!(unit_get(&unit, "a").await["ok"], true);

    unit.stop_and_check_log(&secrets(&[&issuer], &[SECRET_A]));
}

async fn unit_get(unit: &Daemon, key: &str) -> Answer {
    get(&mut Conn::open(&unit.socket).await, key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_passed_socket_and_binds_none() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("a", SECRET_A, &[])]).await;
    let mut unit = Daemon::builder()
        .keys(&key("k", &issuer, "a", SECRET_A, ""))
        .socket_activated()
        .start();
    let configured = unit.dir.path().join("tokend.sock");

    // The first connection makes systemd-socket-activate exec tokend.
    let mut conn = Conn::open(&unit.socket).await;
    let answer = get(&mut conn, "k").await;
    assert_eq!(answer["ok"], true, "{answer}");
    let passed = unit.wait_for_log_line("using the socket systemd passed");
    assert!(
        passed.contains(&unit.socket.display().to_string()),
        "{passed}"
    );

    // tokend listens on exactly one socket, the passed one, and created
    // nothing at the configured path.
    assert_eq!(listening_unix_sockets(unit.pid()), [unit.socket.clone()]);
    assert!(!configured.exists(), "tokend bound the configured socket");

    drop(conn);
    let socket = unit.socket.clone();
    // Stopped in place: the directory stays until `unit` is dropped.
    unit.stop_checked(&secrets(&[&issuer], &[SECRET_A]));
    assert!(socket.exists(), "the passed socket is systemd's to remove");
    assert!(!configured.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_go_to_journald_with_fields_when_stderr_is_the_journal() {
    assert_eq!(
        uid(),
        0,
        "the journal stand-in needs a mount namespace: run as root"
    );
    let issuer = Issuer::start(vec![ClientSpec::checkout("a", SECRET_A, &["gateway"])]).await;
    let failing = Issuer::start(vec![ClientSpec::checkout("f", SECRET_B, &[])]).await;
    failing.set_fault(Some(Fault::Status {
        status: 500,
        content_type: "text/html".into(),
        body: "<h1>oops</h1>".into(),
    }));
    let keys = [
        key("k", &issuer, "a", SECRET_A, "scopes = [\"gateway\"]"),
        key("down", &failing, "f", SECRET_B, "prefetch = [[]]"),
    ]
    .concat();
    let unit = Daemon::builder().keys(&keys).journald().start();
    let mut conn = Conn::open(&unit.socket).await;
    let answer = conn
        .call(json!({"op": "get", "key": "k", "scopes": ["gateway"]}))
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(get(&mut conn, "nope").await["error"]["code"], "unknown_key");

    let me = std::process::id().to_string();
    let uid = uid().to_string();
    let handout = unit.wait_for_entry("the handout", |e| {
        field(e, "MESSAGE") == Some("handed out a token")
    });
    assert_eq!(field(&handout, "KEY"), Some("k"), "{handout:?}");
    assert_eq!(field(&handout, "SCOPES"), Some("[gateway]"), "{handout:?}");
    assert_eq!(
        field(&handout, "PEER_UID"),
        Some(uid.as_str()),
        "{handout:?}"
    );
    assert_eq!(
        field(&handout, "PEER_PID"),
        Some(me.as_str()),
        "{handout:?}"
    );
    assert_eq!(
        field(&handout, "PRIORITY"),
        Some("5"),
        "info is notice: {handout:?}"
    );
    assert_eq!(field(&handout, "SYSLOG_IDENTIFIER"), Some("tokend"));
    // The caller's gid and executable, as plain values (the text log
    // quotes them; the journal takes them as they are): this test binary.
    let gid = nix::unistd::getgid().as_raw().to_string();
    let exe = std::env::current_exe().expect("own exe");
    let comm = std::fs::read_to_string("/proc/self/comm").expect("own comm");
    assert_eq!(
        field(&handout, "PEER_GID"),
        Some(gid.as_str()),
        "{handout:?}"
    );
    assert_eq!(
        field(&handout, "PEER_EXE").map(std::path::PathBuf::from),
        Some(exe),
        "{handout:?}"
    );
    assert_eq!(
        field(&handout, "PEER_COMM"),
        Some(comm.trim_end_matches('\n')),
        "{handout:?}"
    );
    let denial = unit.wait_for_entry("the denial", |e| field(e, "KEY") == Some("nope"));
    assert_eq!(field(&denial, "PEER_PID"), Some(me.as_str()), "{denial:?}");
    let failure = unit.wait_for_entry("the issuer failure", |e| {
        field(e, "ISSUER_STATUS").is_some()
    });
    assert_eq!(field(&failure, "KEY"), Some("down"), "{failure:?}");
    assert_eq!(field(&failure, "ISSUER_STATUS"), Some("500"), "{failure:?}");
    assert_eq!(
        unit.stderr(),
        Vec::<String>::new(),
        "nothing goes to stderr as text"
    );

    drop(conn);
    unit.stop_and_check_log(&secrets(&[&issuer, &failing], &[SECRET_A, SECRET_B]));
}

/// The paths of the listening Unix sockets process `pid` holds, from
/// /proc/PID/fd and /proc/net/unix.
fn listening_unix_sockets(pid: u32) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the daemon's fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is
    // __SO_ACCEPTCON, a listening socket.
    std::fs::read_to_string("/proc/net/unix")
        .expect("read /proc/net/unix")
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode = fields.get(6)?;
            let listening = flags & 0x0001_0000 != 0;
            (listening && inodes.iter().any(|i| i == inode))
                .then(|| PathBuf::from(fields.get(7).copied().unwrap_or("(unnamed)")))
        })
        .collect()
}

fn run(command: &mut Command) -> (bool, String) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("failed to run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The exposure score `systemd-analyze security --offline=true` gives.
fn security_score(unit: &Path) -> f64 {
    let (_, text) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit));
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    println!("{}", overall.trim_start_matches('→').trim());
    overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable score: {overall}"))
}

#[test]
fn units_verify_without_warnings_and_score_at_most_1_5() {
    let score = security_score(&Path::new(REPO).join("systemd/tokend.service"));
    assert!(score <= 1.5, "exposure {score} is over 1.5");

    // verify checks that ExecStart= and ExecReload= exist and that
    // man:tokend(8) resolves: point the copy at the built binary and man at
    // the shipped page.
    let dir = tempfile::tempdir().expect("dir");
    let service = std::fs::read_to_string(Path::new(REPO).join("systemd/tokend.service"))
        .expect("read the service");
    assert!(service.contains("ExecStart=/usr/bin/tokend "));
    assert!(service.contains("ExecReload=/usr/bin/tokend reload"));
    let service = service.replace("=/usr/bin/tokend ", &format!("={TOKEND} "));
    std::fs::write(dir.path().join("tokend.service"), service).expect("write");
    std::fs::copy(
        Path::new(REPO).join("systemd/tokend.socket"),
        dir.path().join("tokend.socket"),
    )
    .expect("copy the socket");
    let man8 = dir.path().join("man/man8");
    std::fs::create_dir_all(&man8).expect("man dir");
    std::fs::copy(
        Path::new(REPO).join("packaging/tokend.8"),
        man8.join("tokend.8"),
    )
    .expect("copy");
    let (ok, text) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("tokend.service"))
        .arg(dir.path().join("tokend.socket"))
        .env("MANPATH", dir.path().join("man")));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

#[test]
fn the_shipped_man_page_is_what_the_cli_generates() {
    let out = Command::new(TOKEND)
        .arg("man")
        .output()
        .expect("run tokend man");
    assert!(out.status.success());
    let shipped = std::fs::read(Path::new(REPO).join("packaging/tokend.8")).expect("read");
    assert!(
        out.stdout == shipped,
        "packaging/tokend.8 is stale: regenerate it with `cargo run -- man > packaging/tokend.8`"
    );
}

#[test]
fn the_example_config_checks_and_its_examples_parse_once_uncommented() {
    let path = Path::new(REPO).join("config/tokend.toml");
    let example = std::fs::read_to_string(&path).expect("read");
    // Checked as installed, root's and 0600: the checkout itself may belong
    // to whoever cloned it, which tokend refuses as root's configuration.
    let dir = tempfile::tempdir().expect("dir");
    let installed = dir.path().join("tokend.toml");
    write_private(&installed, &example);
    let (ok, text) = run(Command::new(TOKEND)
        .args(["check", "--config"])
        .arg(&installed));
    assert!(ok && text.contains("ok (0 keys)"), "{text}");

    // Commented-out settings are "#name" lines; prose is "# text".
    let uncommented: String = example
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let config = tokend::config::parse(&uncommented, &path).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&String> = config.keys.keys().collect();
    assert_eq!(names, ["cards", "payments"]);
}

/// The installed package: purged by [`Installed::purge`], or on drop when
/// the test fails before that.
struct Installed {
    purged: bool,
}

impl Installed {
    fn purge(mut self) -> (bool, String) {
        self.purged = true;
        run(Command::new("dpkg").args(["--purge", "tokend"]))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = Command::new("dpkg").args(["--purge", "tokend"]).output();
        }
    }
}

#[test]
fn the_debian_package_installs_checks_and_purges_cleanly() {
    assert_eq!(uid(), 0, "dpkg needs root: run scripts/test as root");
    let (have_deb, _) = run(Command::new("cargo").args(["deb", "--version"]));
    assert!(have_deb, "cargo-deb is missing: scripts/test installs it");
    let (present, _) = run(Command::new("dpkg-query").args(["-W", "tokend"]));
    assert!(
        !present,
        "a tokend package is already installed here; this test will not replace it"
    );

    let out = tempfile::tempdir().expect("dir");
    let deb = support::build_deb(out.path());

    let installed = Installed { purged: false };
    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i failed:\n{text}");

    let tokend_user = nix::unistd::User::from_name("tokend")
        .expect("look up tokend")
        .expect("sysusers.d created the tokend user");
    let expect = |path: &str, mode: u32, owner: u32| {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path} mode");
        assert_eq!(meta.uid(), owner, "{path} owner");
    };
    let tokend_uid = tokend_user.uid.as_raw();
    expect("/usr/bin/tokend", 0o755, 0);
    expect("/usr/libexec/tokend/tokend-daemon", 0o755, 0);
    expect("/etc/tokend/tokend.toml", 0o600, tokend_uid);
    expect("/etc/tokend/credentials", 0o700, 0);
    expect("/usr/lib/systemd/system/tokend.service", 0o644, 0);
    expect("/usr/lib/systemd/system/tokend.socket", 0o644, 0);
    expect("/usr/lib/sysusers.d/tokend.conf", 0o644, 0);
    expect("/usr/lib/tmpfiles.d/tokend.conf", 0o644, 0);
    expect("/usr/share/man/man8/tokend.8.gz", 0o644, 0);
    let (_, conffiles) = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "tokend"]));
    assert!(conffiles.contains("/etc/tokend/tokend.toml"), "{conffiles}");

    let (ok, text) =
        run(Command::new("/usr/bin/tokend").args(["check", "--config", "/etc/tokend/tokend.toml"]));
    assert!(ok, "tokend check rejects the installed example:\n{text}");
    let (ok, text) = run(Command::new("systemd-analyze").args([
        "verify",
        "/usr/lib/systemd/system/tokend.service",
        "/usr/lib/systemd/system/tokend.socket",
    ]));
    assert!(
        ok && text.trim().is_empty(),
        "verify of the installed units:\n{text}"
    );

    let (ok, text) = installed.purge();
    assert!(ok, "dpkg --purge failed:\n{text}");
    let (present, _) = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "tokend"]));
    assert!(!present, "tokend is still known to dpkg after --purge");
    for gone in [
        "/usr/bin/tokend",
        "/usr/libexec/tokend",
        "/etc/tokend",
        "/usr/lib/systemd/system/tokend.service",
        "/usr/lib/systemd/system/tokend.socket",
        "/usr/lib/sysusers.d/tokend.conf",
        "/usr/lib/tmpfiles.d/tokend.conf",
        "/usr/share/man/man8/tokend.8.gz",
        "/etc/systemd/system/multi-user.target.wants/tokend.service",
        "/etc/systemd/system/sockets.target.wants/tokend.socket",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    let (_, overrides) = run(Command::new("dpkg-statoverride").arg("--list"));
    assert!(!overrides.contains("/etc/tokend"), "{overrides}");
}
