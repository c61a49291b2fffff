//! Starting and stopping `tokend serve`: signals, the 5 s promise, the
//! socket file's life, and refusing to start over something in the way.

mod support;

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::daemon::{write_private, Daemon, TOKEND};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, Key};

const SECRET: &str = "lifecycle-secret-31";

async fn keys(issuer: &Issuer, extra: &str) -> String {
    Key::new("k")
        .issuer(issuer, Dialect::Checkout)
        .client("c", SECRET)
        .allow_uids(&[0])
        .extra(extra)
        .toml()
}

#[tokio::test]
async fn sigterm_answers_in_flight_gets_and_exits_zero_within_5s() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    issuer.set_fault(Some(Fault::Delay(Duration::from_secs(30))));
    let mut daemon = Daemon::start("", &keys(&issuer, r#"request_timeout = "60s""#).await);
    let mut waiting = daemon.connect().await;
    waiting
        .send_raw(b"{\"op\":\"get\",\"key\":\"k\",\"id\":\"w\"}\n")
        .await;
    issuer.wait_for_requests(1, Duration::from_secs(10)).await;
    let mut idle = daemon.connect().await;
    assert_eq!(idle.call(json!({"op":"ping"})).await["ok"], true);

    let socket = daemon.socket.clone();
    let stopper = std::thread::spawn(move || daemon.signal_and_wait(libc::SIGTERM));
    let answer = waiting.recv().await;
    assert_eq!(answer["id"], "w");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("shutting down")));
    idle.expect_eof().await;
    let (status, took) = stopper.join().expect("stopper");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!socket.exists(), "the socket file is removed");
}

#[tokio::test]
async fn sigint_stops_cleanly_too() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let mut daemon = Daemon::start("", &keys(&issuer, "").await);
    let token = daemon.call(json!({"op":"get","key":"k"})).await;
    assert_eq!(token["ok"], true);
    let (status, took) = daemon.signal_and_wait(libc::SIGINT);
    assert!(
        status.success() && took < Duration::from_secs(5),
        "{status} {took:?}"
    );
    assert!(!daemon.socket.exists());
    support::daemon::assert_log_clean(&daemon.log(), &secrets(&[&issuer], &[SECRET]));
}

/// Runs `tokend serve` on a config whose socket is `socket` and returns its
/// exit status and stderr; for starts that must fail.
fn serve_expecting_failure(
    dir: &std::path::Path,
    socket: &std::path::Path,
) -> (std::process::ExitStatus, String) {
    let config = dir.join("tokend.toml");
    write_private(
        &config,
        &format!("[daemon]\nsocket = {:?}\n", socket.display().to_string()),
    );
    let out = Command::new(TOKEND)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run tokend");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A start that fails after the socket is bound (here: the HTTP clients
/// cannot be built, because the trust store `SSL_CERT_FILE` names holds no
/// usable certificate) must not leave the socket file behind: under
/// systemd's restarts, each failed start would otherwise find it there.
#[test]
fn a_start_that_fails_after_binding_the_socket_removes_it() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("tokend.sock");
    let config = dir.path().join("tokend.toml");
    write_private(
        &config,
        &format!("[daemon]\nsocket = {:?}\n", socket.display().to_string()),
    );
    let bundle = dir.path().join("bad-ca.pem");
    std::fs::write(
        &bundle,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .expect("write the bundle");
    let out = Command::new(TOKEND)
        .args(["serve", "--config"])
        .arg(&config)
        .env("SSL_CERT_FILE", &bundle)
        .env_remove("SSL_CERT_DIR")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .output()
        .expect("run tokend");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed to set up the HTTP clients"),
        "{stderr}"
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket file was left behind; stderr:\n{stderr}"
    );
}

#[test]
fn refuses_a_regular_file_or_symlink_at_the_socket_path() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokend.sock");
    std::fs::write(&file, "precious").expect("write");
    let (status, stderr) = serve_expecting_failure(dir.path(), &file);
    assert!(!status.success());
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("not a socket"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "precious"
    );

    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let (status, stderr) = serve_expecting_failure(dir.path(), &link);
    assert!(!status.success());
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
}

#[test]
fn refuses_a_live_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("tokend.sock");
    let _live = UnixListener::bind(&path).expect("bind");
    let (status, stderr) = serve_expecting_failure(dir.path(), &path);
    assert!(!status.success());
    assert!(stderr.contains("another process is listening"), "{stderr}");
    assert!(path.exists());
}

#[tokio::test]
async fn replaces_a_stale_socket() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let dir = tempfile::tempdir().expect("dir");
    let stale = dir.path().join("tokend.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    assert!(
        std::os::unix::net::UnixStream::connect(&stale).is_err(),
        "stale: nobody listens"
    );
    let daemon = Daemon::start_in(dir, "", &keys(&issuer, "").await);
    assert_eq!(daemon.socket, stale);
    assert_eq!(daemon.call(json!({"op":"ping"})).await["ok"], true);
    daemon.stop_and_check_log(&[SECRET]);
}

#[test]
fn a_broken_config_stops_start_up_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("tokend.toml");
    write_private(&config, "[daemon]\nmax_connections = \"many\"\n");
    let out = Command::new(TOKEND)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:19:", config.display())),
        "{stderr}"
    );
}

#[test]
fn refuses_a_socket_directory_others_can_write_without_the_sticky_bit() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (status, stderr) = serve_expecting_failure(dir.path(), &open.join("tokend.sock"));
    assert!(!status.success());
    assert!(
        stderr.contains("writable by others without the sticky bit"),
        "{stderr}"
    );
    assert!(!open.join("tokend.sock").exists());
    // The same directory with the sticky bit (as /tmp has) is accepted.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let config = dir.path().join("tokend.toml");
    write_private(
        &config,
        &format!(
            "[daemon]\nsocket = {:?}\n",
            open.join("tokend.sock").display().to_string()
        ),
    );
    let mut child = Command::new(TOKEND)
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tokend");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(" listening "));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
    assert!(
        listening.is_some(),
        "tokend did not start in a sticky directory"
    );
}

#[tokio::test]
async fn the_socket_gets_the_configured_group_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let group = nix::unistd::Group::from_name("tokend-test-billing")
        .expect("group lookup")
        .expect("group tokend-test-billing: run scripts/test-setup");
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let daemon = Daemon::start(
        "socket_group = \"tokend-test-billing\"\nsocket_mode = \"0660\"",
        &keys(&issuer, "").await,
    );
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(meta.gid(), group.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    daemon.stop_and_check_log(&[SECRET]);
}
