//! What an operator does at 2 a.m.: reloads with `tokend reload` (what the
//! unit's `ExecReload=` runs) and reads its exit status, and starts a
//! daemon one of whose secrets cannot be read (issue 10).

mod support;

use serde_json::json;
use support::cli::{as_caller, run, tokend, Ran};
use support::daemon::{test_user, tokend_for_anyone, write_private, Daemon};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::{secrets, Key};

const SECRET_A: &str = "operator-secret-a-4411";
const SECRET_B: &str = "operator-secret-b-9902";

/// A key for `issuer`'s Checkout `client`, readable by root; the secret's
/// source is the caller's to add.
fn key(name: &str, issuer: &Issuer, client: &str) -> Key {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client_id(client)
        .allow_uids(&[0])
}

async fn reload(daemon: &Daemon) -> Ran {
    let mut command = tokend();
    command.arg("reload").arg("--socket").arg(&daemon.socket);
    run(command, b"").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_its_outcome_and_only_privileged_callers_may_ask() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("a", SECRET_A, &[])]).await;
    let first = key("a", &issuer, "a").secret(SECRET_A).toml();
    let daemon = Daemon::start("", &first);
    let token = daemon.call(json!({"op": "get", "key": "a"})).await;
    assert_eq!(token["ok"], true, "{token}");

    // A second key: reloaded, and the first key's token kept.
    let second = key("b", &issuer, "a").secret(SECRET_A).toml();
    daemon.rewrite_keys(&format!("{first}\n{second}"));
    let ran = reload(&daemon).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout.trim(), "tokend: reloaded (2 keys)");
    let again = daemon.call(json!({"op": "get", "key": "a"})).await;
    assert_eq!(again.token(), token.token(), "the token was kept");
    assert_eq!(
        daemon.call(json!({"op": "get", "key": "b"})).await["ok"],
        true
    );

    // A broken file: exit 1 with FILE:LINE:COL, and the old keys stay.
    daemon.rewrite_keys(&format!("{first}\n[keys.c]\ntoken_url = 7\n"));
    let ran = reload(&daemon).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let shown = format!("{}:", daemon.config_path.display());
    assert!(ran.stderr.contains("reload refused"), "{ran:?}");
    assert!(ran.stderr.contains(&shown), "{ran:?}");
    assert_eq!(
        daemon.call(json!({"op": "get", "key": "b"})).await["ok"],
        true
    );

    // Another uid may connect but not reload.
    let bob = test_user("tokend-test-bob");
    std::fs::set_permissions(
        &daemon.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod socket");
    let mut command = as_caller(
        &tokend_for_anyone().to_string_lossy(),
        bob.uid,
        bob.gid,
        &bob.groups,
    );
    command.arg("reload").arg("--socket").arg(&daemon.socket);
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("may not reload"), "{ran:?}");

    // Nobody there: exit 3.
    let mut command = tokend();
    command
        .arg("reload")
        .arg("--socket")
        .arg(daemon.dir.path().join("nothing.sock"));
    assert_eq!(run(command, b"").await.code, Some(3));

    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET_A]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_secret_leaves_the_other_keys_served_until_a_reload_fixes_it() {
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("a", SECRET_A, &[]),
        ClientSpec::checkout("b", SECRET_B, &[]),
    ])
    .await;
    let secrets_dir = tempfile::tempdir().expect("dir");
    let missing = secrets_dir.path().join("b.secret");
    let keys = key("a", &issuer, "a").secret(SECRET_A).toml()
        + &key("b", &issuer, "b").secret_file(&missing).toml();
    let mut daemon = Daemon::start("", &keys);
    daemon.wait_for_log("key \"b\" is unusable until a reload");
    assert_eq!(
        daemon.call(json!({"op": "get", "key": "a"})).await["ok"],
        true
    );
    let answer = daemon.call(json!({"op": "get", "key": "b"})).await;
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("client secret could not be read"),
        "{message}"
    );
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    // The issuer was never asked for b.
    assert!(issuer
        .requests()
        .iter()
        .all(|r| r.basic.as_ref().map(|b| b.0.as_str()) != Some("b")));
    // `tokend check` says what is wrong, and fails.
    let mut command = tokend();
    command.args(["check", "--config"]).arg(&daemon.config_path);
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");

    // The operator puts the secret in place and reloads.
    write_private(&missing, SECRET_B);
    let ran = reload(&daemon).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let answer = daemon.call(json!({"op": "get", "key": "b"})).await;
    assert_eq!(answer["ok"], true, "{answer}");

    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET_A, SECRET_B]));
}

/// A failed start names the step that failed, once, and leaves no socket
/// file behind.
#[test]
fn a_failed_chown_names_the_step_and_leaves_no_socket() {
    let bob = test_user("tokend-test-bob");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::chown(dir.path(), Some(bob.uid), Some(bob.gid)).expect("chown");
    let socket = dir.path().join("tokend.sock");
    let config = dir.path().join("tokend.toml");
    // bob is not in group tokend-test-billing: the chown must fail.
    write_private(
        &config,
        &format!(
            "[daemon]\nsocket = {:?}\nsocket_group = \"tokend-test-billing\"\n",
            socket.display().to_string()
        ),
    );
    std::os::unix::fs::chown(&config, Some(bob.uid), Some(bob.gid)).expect("chown");
    let mut command = as_caller(
        &tokend_for_anyone().to_string_lossy(),
        bob.uid,
        bob.gid,
        &bob.groups,
    );
    let out = command
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run tokend");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("failed to give")
            && stderr.contains("to socket_group \"tokend-test-billing\""),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Operation not permitted").count(),
        1,
        "the cause once: {stderr}"
    );
    assert!(!socket.exists(), "a socket file was left behind");
    // And with bob's own group, no chown is needed at all.
    let own = nix::unistd::Group::from_gid(bob.gid.into())
        .expect("group")
        .expect("bob's group")
        .name;
    let mut daemon = Daemon::start_with(
        tempfile::tempdir().expect("dir"),
        &format!("socket_group = {own:?}"),
        "",
        |dir| {
            for entry in [dir.to_path_buf(), dir.join("tokend.toml")] {
                std::os::unix::fs::chown(&entry, Some(bob.uid), Some(bob.gid)).expect("chown");
            }
            as_caller(
                &tokend_for_anyone().to_string_lossy(),
                bob.uid,
                bob.gid,
                &bob.groups,
            )
        },
    );
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), bob.gid);
    let (status, _) = daemon.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{}", daemon.log());
}
