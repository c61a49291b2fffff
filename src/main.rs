//! The `tokend` command. It parses the command line (src/cli.rs) and runs
//! the subcommands that talk to a running daemon itself; `serve` and
//! `check` it hands, arguments unchanged, to `tokend-daemon`, found beside
//! it or, as the Debian package installs it, in `../libexec/tokend/`.
//!
//! Why two programs: `tokend get` starts a process per token, so its start
//! is most of its cost. This program is linked statically
//! (`.cargo/rustc-wrapper` adds `+crt-static` for it alone), so no dynamic
//! loader runs, and it has no `main` of the standard library's, whose
//! start-up reads `/proc/self/maps` to place the main thread's stack guard.
//! A statically linked glibc cannot load the name-service modules of
//! another glibc version, and `serve` and `check` need them for user and
//! group names and for DNS: those stay in the dynamically linked
//! `tokend-daemon`. Nothing here looks up a name.

#![no_main]

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use tokend::cli;

/// The program that runs `serve` and `check`.
const DAEMON: &str = "tokend-daemon";
/// Where the Debian package puts it, from the directory of `tokend`.
const PACKAGED: &str = "../libexec/tokend/tokend-daemon";
/// The same, for when `/proc` is not mounted.
const PACKAGED_ABSOLUTE: &str = "/usr/libexec/tokend/tokend-daemon";

/// The C entry point: the standard library's own `main` is left out
/// (module doc), so this does the two parts of its start-up that matter
/// here, then runs the command.
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    open_standard_fds();
    // As the standard library's start-up does: a reader that goes away
    // makes a write fail with EPIPE, which the command reports, instead of
    // killing it. `Command::exec` restores the default for tokend-daemon.
    // SAFETY: setting a signal's disposition to SIG_IGN has no
    // preconditions, and no other thread exists yet.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let args: Vec<OsString> = std::env::args_os().collect();
    let socket = std::env::var_os(cli::SOCKET_ENV);
    let command = match cli::quick_get(&args, socket.as_deref()) {
        Some(get) => get,
        None => cli::parse(&args, socket.as_deref()).command,
    };
    let code = match cli::run_client(command) {
        Ok(code) => code,
        Err(_) => exec_daemon(&args),
    };
    // Without the standard library's `main` nothing flushes stdout at exit.
    let _ = std::io::stdout().flush();
    libc::c_int::from(code)
}

/// Opens /dev/null on any of stdin, stdout and stderr that is closed, so
/// that the socket never becomes fd 1 and receives what is meant for
/// stdout (the standard library's start-up does the same).
fn open_standard_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any number only reads the descriptor table.
        let closed = unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF);
        if closed {
            // The lowest free descriptor is `fd`: those below it are open.
            // SAFETY: a constant, NUL-terminated path.
            let opened = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if opened != fd {
                // SAFETY: abort(3) has no preconditions.
                unsafe { libc::abort() };
            }
        }
    }
}

/// Replaces this process with tokend-daemon, same arguments, same
/// `argv[0]`; returns only when that fails.
fn exec_daemon(args: &[OsString]) -> u8 {
    let program = match daemon_program() {
        Ok(program) => program,
        Err(looked) => {
            eprintln!(
                "tokend: {DAEMON}, which runs `serve` and `check`, is not installed: looked for {looked}"
            );
            return 1;
        }
    };
    let mut command = std::process::Command::new(&program);
    if let Some((arg0, rest)) = args.split_first() {
        command.arg0(arg0).args(rest);
    }
    let err = command.exec();
    eprintln!("tokend: failed to run {}: {err}", program.display());
    1
}

/// tokend-daemon beside this program (a build's target directory, `cargo
/// install`), else where the package installs it; on failure, the places
/// looked at, in words.
fn daemon_program() -> Result<PathBuf, String> {
    let candidates = match std::env::current_exe() {
        Ok(exe) => {
            let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            vec![dir.join(DAEMON), dir.join(PACKAGED)]
        }
        Err(_) => vec![PathBuf::from(PACKAGED_ABSOLUTE)],
    };
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            let shown: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            shown.join(" and ")
        })
}
