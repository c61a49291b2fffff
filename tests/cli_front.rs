//! `tokend` and `tokend-daemon`: the command is statically linked and
//! looks up no names, hands `serve` and `check` to tokend-daemon beside it
//! or in the package's `../libexec/tokend/`, says so when that is missing,
//! and runs the client subcommands on its own. It also does what the
//! standard library's start-up did for it: a closed stdout never becomes
//! the socket, and a reader that went away is an error, not a signal.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::cli::{run, tokend};
use support::daemon::{Daemon, PATIENCE, TOKEND, TOKEND_DAEMON};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, Key};

const SECRET: &str = "front-secret-3e9a1c";

async fn setup() -> (Issuer, Daemon) {
    let issuer = Issuer::start(vec![ClientSpec::checkout("front", SECRET, &["a"])]).await;
    let keys = Key::new("k")
        .issuer(&issuer, Dialect::Checkout)
        .client("front", SECRET)
        .allow_uids(&[0])
        .toml();
    (issuer, Daemon::start("", &keys))
}

/// The ELF program header types of `path` (64-bit little-endian only).
fn program_headers(path: &str) -> Vec<u32> {
    let elf = std::fs::read(path).expect("read the binary");
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "{path}: not 64-bit LE ELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"))
        })
        .collect()
}

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;

#[test]
fn tokend_is_static_and_tokend_daemon_dynamic() {
    let front = program_headers(TOKEND);
    assert!(
        !front.contains(&PT_INTERP),
        "tokend asks for a dynamic loader: .cargo/rustc-wrapper did not link it statically"
    );
    // static-pie: relocated by itself, so it still has a dynamic section.
    assert!(
        front.contains(&PT_DYNAMIC),
        "tokend is not position-independent"
    );
    assert!(
        program_headers(TOKEND_DAEMON).contains(&PT_INTERP),
        "tokend-daemon must use the system's glibc and its name services"
    );
}

/// A static glibc cannot load another version's name-service modules, so
/// the static program must not call the functions that would.
#[test]
fn tokend_looks_up_no_names() {
    let out = Command::new("nm")
        .args(["--defined-only", "--format=posix"])
        .arg(TOKEND)
        .output()
        .expect("run nm (binutils)");
    assert!(out.status.success(), "nm failed");
    let symbols = String::from_utf8_lossy(&out.stdout);
    let lookups = [
        "getpwnam",
        "getpwuid",
        "getgrnam",
        "getgrgid",
        "getgrouplist",
        "getaddrinfo",
        "gethostbyname",
    ];
    for line in symbols.lines() {
        let name = line.split(' ').next().unwrap_or_default();
        let base = name.split('@').next().unwrap_or_default();
        for lookup in lookups {
            assert!(
                !(base == lookup || base.starts_with(&format!("{lookup}_r"))),
                "tokend links {name}"
            );
        }
    }
}

/// `dir/tokend`, copied, and tokend-daemon at `daemon_at` under `dir`
/// when given.
fn install(dir: &Path, daemon_at: Option<&str>) -> PathBuf {
    let place = |from: &str, to: PathBuf| {
        std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
        std::fs::copy(from, &to).expect("copy");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    let front = dir.join("bin/tokend");
    place(TOKEND, front.clone());
    if let Some(at) = daemon_at {
        place(TOKEND_DAEMON, dir.join(at));
    }
    front
}

fn check(front: &Path, config: &Path) -> Command {
    let mut command = Command::new(front);
    command
        .env_remove("TOKEND_SOCKET")
        .arg("check")
        .arg("--config")
        .arg(config);
    command
}

#[tokio::test]
async fn serve_and_check_go_to_tokend_daemon_beside_or_in_libexec() {
    let (issuer, daemon) = setup().await;
    let config = daemon.config_path.clone();
    for (layout, at) in [
        ("cargo", "bin/tokend-daemon"),
        ("package", "libexec/tokend/tokend-daemon"),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let front = install(dir.path(), Some(at));
        let ran = run(check(&front, &config), b"").await;
        assert_eq!(ran.code, Some(0), "{layout} layout: {ran:?}");
        assert!(ran.stdout.ends_with(": ok (1 keys)\n"), "{layout}: {ran:?}");
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn without_tokend_daemon_check_says_where_it_looked_and_get_still_works() {
    let (issuer, daemon) = setup().await;
    let config = daemon.config_path.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let front = install(dir.path(), None);
    let ran = run(check(&front, &config), b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let bin = dir.path().join("bin");
    assert_eq!(
        ran.stderr,
        format!(
            "tokend: tokend-daemon, which runs `serve` and `check`, is not installed: looked \
             for {0}/tokend-daemon and {0}/../libexec/tokend/tokend-daemon\n",
            bin.display()
        ),
        "{ran:?}"
    );
    assert!(ran.stdout.is_empty(), "{ran:?}");

    // The client subcommands need nothing else.
    for args in [&["get", "k"][..], &["status"], &["keys"]] {
        let mut command = Command::new(&front);
        command
            .env_remove("TOKEND_SOCKET")
            .args(args)
            .arg("--socket")
            .arg(&daemon.socket);
        let ran = run(command, b"").await;
        assert_eq!(ran.code, Some(0), "{args:?}: {ran:?}");
        assert!(!ran.stdout.is_empty(), "{args:?}: {ran:?}");
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn a_closed_stdout_never_becomes_the_socket() {
    let (issuer, daemon) = setup().await;
    // The issuer holds its answer, so the get stays connected, waiting.
    issuer.set_fault(Some(Fault::Delay(Duration::from_secs(60))));
    let mut command = tokend();
    command
        .arg("get")
        .arg("k")
        .arg("--socket")
        .arg(&daemon.socket);
    // SAFETY: close(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::close(1);
            Ok(())
        });
    }
    let mut child = command.stderr(Stdio::null()).spawn().expect("spawn tokend");
    issuer.wait_for_requests(1, PATIENCE).await;
    let fd = |n: u32| std::fs::read_link(format!("/proc/{}/fd/{n}", child.id()));
    // The daemon has the request, so the connection is open: it must be a
    // descriptor of its own, with /dev/null standing in for stdout.
    let socket = fd(3).expect("fd 3 is open");
    assert!(
        socket.to_string_lossy().starts_with("socket:"),
        "fd 3 is {socket:?}"
    );
    assert_eq!(fd(1).expect("fd 1 is open"), Path::new("/dev/null"));
    child.kill().expect("kill");
    child.wait().expect("wait");
    issuer.set_fault(None);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn a_reader_gone_away_is_an_error_not_a_signal() {
    let (issuer, daemon) = setup().await;
    let mut command = tokend();
    command
        .arg("get")
        .arg("k")
        .arg("--socket")
        .arg(&daemon.socket);
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    command.stdout(Stdio::from(writer)).stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("spawn tokend");
    assert_eq!(out.status.code(), Some(1), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("tokend: failed to write the token: Broken pipe"),
        "{stderr}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// What a run printed, with `expires_in` (which a second may change
/// between two runs) taken out of a JSON answer.
fn comparable(ran: &support::cli::Ran) -> (Option<i32>, String, String) {
    let stdout = match serde_json::from_str::<serde_json::Value>(ran.stdout.trim_end()) {
        Ok(mut answer) => {
            answer.as_object_mut().map(|o| o.remove("expires_in"));
            answer.to_string()
        }
        Err(_) => ran.stdout.clone(),
    };
    (ran.code, stdout, ran.stderr.clone())
}

/// `tokend` parses `get` without clap (src/cli.rs, `quick_get`) and
/// tokend-daemon always with clap: the same command line must print the
/// same and exit the same through both, for the lines the quick parser
/// takes and for those it leaves to clap.
#[tokio::test]
async fn tokend_and_tokend_daemon_answer_every_get_alike() {
    let (issuer, daemon) = setup().await;
    let s = daemon.socket.display().to_string();
    let lines = [
        (None, format!("get k --socket {s}")),
        (None, format!("get k --socket={s} --format header")),
        (None, format!("get --format json k --socket {s}")),
        (None, format!("get k --scope a --socket {s} --timeout 5s")),
        (None, format!("get other --socket {s}")),
        (None, "get k --socket /nonexistent/tokend.sock".to_owned()),
        (None, format!("get k --socket {s} --format Token")),
        (None, format!("get --socket {s}")),
        (None, format!("get k --socket {s} --timeout soon")),
        (None, format!("get k --socket {s} --timeout 0s")),
        (None, format!("get k --socket {s} --socket {s}")),
        (None, format!("get k --socket {s} --help")),
        (Some(s.clone()), "get k".to_owned()),
        (Some(s.clone()), "get k --format json".to_owned()),
        (Some(String::new()), "get k".to_owned()),
    ];
    for (env, line) in lines {
        let mut ran = Vec::new();
        for program in [TOKEND, TOKEND_DAEMON] {
            let mut command = Command::new(program);
            // tokend hands tokend-daemon its own argv[0], which clap shows.
            command.arg0(TOKEND).args(line.split(' '));
            match &env {
                Some(socket) => command.env("TOKEND_SOCKET", socket),
                None => command.env_remove("TOKEND_SOCKET"),
            };
            ran.push(run(command, b"").await);
        }
        // Not assert_eq!: its message would print both stdouts, tokens
        // and all; `Ran`'s Debug shows them as fingerprints.
        assert!(
            comparable(&ran[0]) == comparable(&ran[1]),
            "{line} ({env:?}): {ran:?}"
        );
    }
    assert_eq!(issuer.requests().len(), 1, "every get was the cached token");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// An empty `TOKEND_SOCKET` is as good as none: every client subcommand
/// of both programs, the `get` that `tokend` parses without clap among
/// them, uses `--socket` or else the default socket, as the README says,
/// rather than stopping at a usage error.
#[tokio::test]
async fn an_empty_tokend_socket_means_the_default_socket() {
    for program in [TOKEND, TOKEND_DAEMON] {
        for args in [
            &["get", "k"][..],
            &["status"],
            &["keys"],
            &["reload"],
            &["metrics"],
        ] {
            let mut ran = Vec::new();
            for env in [None, Some("")] {
                let mut command = Command::new(program);
                command.arg0(TOKEND).args(args);
                match env {
                    Some(value) => command.env("TOKEND_SOCKET", value),
                    None => command.env_remove("TOKEND_SOCKET"),
                };
                ran.push(run(command, b"").await);
            }
            let what = format!("{program} {}", args.join(" "));
            assert_ne!(ran[1].code, Some(2), "{what}: {:?}", ran[1]);
            assert!(
                comparable(&ran[0]) == comparable(&ran[1]),
                "{what}: unset, then empty: {ran:?}"
            );
        }
    }
}
