//! Starting and stopping `tokend serve`: signals, the 5 s promise, the
//! socket file's life, and refusing to start over something in the way.

mod support;

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::daemon::{write_private, Daemon, TOKEND};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};

const SECRET: &str = "lifecycle-secret-31";

async fn keys(issuer: &Issuer, extra: &str) -> String {
    format!(
        "[keys.k]\ntoken_url = {:?}\nclient_id = \"c\"\nclient_secret = {SECRET:?}\nallow_uids = [0]\n{extra}\n",
        issuer.token_url(Dialect::Checkout)
    )
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
    let mut secrets = issuer.issued_tokens();
    secrets.push(SECRET.into());
    support::daemon::assert_log_clean(&daemon.log(), &secrets);
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
