//! The allow lists against real callers: `tokend get` and `socat` run under
//! other uids and groups (the suite runs as root), so the kernel, not the
//! test, says who is calling. Needs the users `scripts/test-setup` creates.

mod support;

use serde_json::{json, Value};
use support::cli::{as_caller, run, Ran};
use support::daemon::{fingerprint, test_user, tokend_for_anyone, Daemon, TestUser};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::{secrets, tables, Key};

const SECRET: &str = "acl-secret-3c2b1a";
const ALICE: &str = "tokend-test-alice";
const BOB: &str = "tokend-test-bob";
const BILLING: &str = "tokend-test-billing";
/// A uid and gid no user or group on the machine has.
const GHOST: u32 = 54321;

/// Every key's name, for the full matrix.
const KEYS: [&str; 6] = [
    "by_uid",
    "by_user",
    "by_group",
    "nobody",
    "root_only",
    "bob_key",
];

/// Key `name`, the one client's; who may read it is the caller's to add.
fn key(name: &str, issuer: &Issuer) -> Key {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client("acl-client", SECRET)
}

/// One daemon whose keys each grant by a different list.
///
/// The socket is made 0666: the default 0660 root:root would stop the
/// foreign callers at connect(2), and what is under test here is the ACL
/// the daemon applies after accepting, not the socket's mode.
async fn setup(alice: &TestUser) -> (Issuer, Daemon) {
    let issuer = Issuer::start(vec![ClientSpec::checkout("acl-client", SECRET, &[])]).await;
    let keys = tables(&[
        key("by_uid", &issuer).allow_uids(&[alice.uid]),
        key("by_user", &issuer).allow_users(&[ALICE]),
        key("by_group", &issuer).allow_groups(&[BILLING]),
        key("nobody", &issuer),
        key("root_only", &issuer).allow_uids(&[0]),
        key("bob_key", &issuer).allow_users(&[BOB]),
    ]);
    let daemon = Daemon::start(r#"socket_mode = "0666""#, &keys);
    (issuer, daemon)
}

/// A caller: who it is, how to start a program as it, and the keys it may
/// read.
struct Caller {
    label: &'static str,
    uid: u32,
    /// `None` runs the program as the test itself (root).
    creds: Option<(u32, Vec<u32>)>,
    readable: &'static [&'static str],
}

impl Caller {
    fn user(user: &TestUser, readable: &'static [&'static str]) -> Caller {
        Caller {
            label: user.name,
            uid: user.uid,
            creds: Some((user.gid, user.groups.clone())),
            readable,
        }
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut command = match &self.creds {
            Some((gid, groups)) => as_caller(program, self.uid, *gid, groups),
            None => std::process::Command::new(program),
        };
        command.env_remove("TOKEND_SOCKET");
        command
    }
}

fn get(caller: &Caller, daemon: &Daemon, key: &str) -> std::process::Command {
    let mut command = caller.command(&tokend_for_anyone().to_string_lossy());
    command.args(["get", key, "--socket"]).arg(&daemon.socket);
    command
}

fn assert_allowed(ran: &Ran, issuer: &Issuer, what: &str) {
    assert_eq!(ran.code, Some(0), "{what} should be allowed: {ran:?}");
    let token = ran.stdout.strip_suffix('\n').expect("one line");
    assert!(
        issuer.issued_tokens().iter().any(|t| t == token),
        "{what}: token {} is not one the issuer issued",
        fingerprint(token)
    );
    assert!(ran.stderr.is_empty(), "{what}: {ran:?}");
}

fn assert_denied(ran: &Ran, uid: u32, key: &str, what: &str) {
    assert_eq!(ran.code, Some(1), "{what} should be denied: {ran:?}");
    assert!(ran.stdout.is_empty(), "{what}: {ran:?}");
    assert_eq!(
        ran.stderr,
        format!("tokend: uid {uid} may not read key {key:?}\n"),
        "{what}"
    );
}

#[tokio::test]
async fn each_allow_list_admits_exactly_its_callers() {
    let alice = test_user(ALICE);
    let bob = test_user(BOB);
    let billing = nix::unistd::Group::from_name(BILLING)
        .expect("look up group")
        .expect("scripts/test-setup creates the billing group");
    assert!(
        alice.groups.contains(&billing.gid.as_raw()) && alice.gid != billing.gid.as_raw(),
        "alice must be in {BILLING} as a supplementary group only"
    );
    let (issuer, daemon) = setup(&alice).await;
    let callers = [
        Caller::user(&alice, &["by_uid", "by_user", "by_group"]),
        Caller::user(&bob, &["bob_key"]),
        Caller {
            label: "uid 54321 with no name and no groups",
            uid: GHOST,
            creds: Some((GHOST, Vec::new())),
            readable: &[],
        },
        Caller {
            label: "root",
            uid: 0,
            creds: None,
            readable: &["root_only"],
        },
    ];
    for caller in &callers {
        for key in KEYS {
            let ran = run(get(caller, &daemon, key), b"").await;
            let what = format!("{} reading {key}", caller.label);
            if caller.readable.contains(&key) {
                assert_allowed(&ran, &issuer, &what);
            } else {
                assert_denied(&ran, caller.uid, key, &what);
            }
        }
    }
    // `nobody` has no list: nobody at all, root included, got a token for
    // it, and each readable key cost the issuer one request.
    assert_eq!(issuer.requests().len(), 5);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn group_membership_comes_from_the_callers_credentials() {
    let alice = test_user(ALICE);
    let billing = nix::unistd::Group::from_name(BILLING)
        .expect("look up group")
        .expect("scripts/test-setup creates the billing group")
        .gid
        .as_raw();
    let (issuer, daemon) = setup(&alice).await;
    let as_alice = |gid: u32, groups: Vec<u32>| Caller {
        label: ALICE,
        uid: alice.uid,
        creds: Some((gid, groups)),
        readable: &[],
    };

    // Primary gid her own, billing only as a supplementary group.
    let supplementary = as_alice(alice.gid, vec![billing]);
    let ran = run(get(&supplementary, &daemon, "by_group"), b"").await;
    assert_allowed(&ran, &issuer, "alice with billing as a supplementary group");

    // Billing as the primary gid, no supplementary groups.
    let primary = as_alice(billing, Vec::new());
    let ran = run(get(&primary, &daemon, "by_group"), b"").await;
    assert_allowed(&ran, &issuer, "alice with billing as her primary group");

    // The same uid without billing in its credentials is refused, although
    // /etc/group lists her as a member: the kernel's word counts, not the
    // group database's.
    let dropped = as_alice(alice.gid, Vec::new());
    let ran = run(get(&dropped, &daemon, "by_group"), b"").await;
    assert_denied(&ran, alice.uid, "by_group", "alice without billing");
    // Her uid and name still work without any group.
    let ran = run(get(&dropped, &daemon, "by_user"), b"").await;
    assert_allowed(&ran, &issuer, "alice without billing, by name");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn socat_as_bob_lists_only_the_keys_bob_can_read() {
    let alice = test_user(ALICE);
    let bob = test_user(BOB);
    let (issuer, daemon) = setup(&alice).await;
    let bob = Caller::user(&bob, &["bob_key"]);
    let mut socat = bob.command("socat");
    socat
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", daemon.socket.display()));
    let ran = run(socat, b"{\"op\":\"keys\"}\n").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let answer: Value = serde_json::from_str(&ran.stdout).expect("one JSON answer");
    assert_eq!(answer["ok"], true, "{answer}");
    let names: Vec<&str> = answer["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["bob_key"], "{answer}");

    // Root, for contrast, sees its own key and no other.
    let mut socat = std::process::Command::new("socat");
    socat
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", daemon.socket.display()));
    let ran = run(socat, b"{\"op\":\"keys\"}\n").await;
    let answer: Value = serde_json::from_str(&ran.stdout).expect("one JSON answer");
    assert_eq!(answer["keys"][0]["name"], "root_only", "{answer}");
    assert_eq!(answer["keys"].as_array().map(Vec::len), Some(1), "{answer}");
    assert!(issuer.requests().is_empty());
    daemon.stop_and_check_log(&[SECRET]);
}

/// Names are looked up only when an allow list names someone, and then
/// once per connection: a connection opened while every list was by uid
/// is judged by name after a reload adds a key by user and group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_before_a_reload_is_judged_by_name_after_it() {
    let alice = test_user(ALICE);
    let issuer = Issuer::start(vec![ClientSpec::checkout("acl-client", SECRET, &[])]).await;
    let by_uid = key("by_uid", &issuer).allow_uids(&[alice.uid]).toml();
    let mut daemon = Daemon::start(r#"socket_mode = "0666""#, &by_uid);
    let stream =
        support::foreign::connect_as(&daemon.socket, alice.uid, alice.gid, &alice.groups, 1)
            .pop()
            .expect("one connection");
    let mut conn = support::daemon::Conn::from_stream(stream);
    let ask = |key: &str| json!({"op": "get", "key": key});
    assert_eq!(conn.call(ask("by_uid")).await["ok"], true);

    let by_name = tables(&[
        key("by_user", &issuer).allow_users(&[ALICE]),
        key("by_group", &issuer).allow_groups(&[BILLING]),
    ]);
    daemon.rewrite_keys(&format!("{by_uid}\n{by_name}"));
    assert!(daemon.reload_and_wait(), "{}", daemon.log());
    for name in ["by_user", "by_group"] {
        let answer = conn.call(ask(name)).await;
        assert_eq!(answer["ok"], true, "{name}: {answer}");
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}
