//! Process hardening at start-up: keeping secrets out of core dumps and
//! away from same-uid debuggers, and room for one file descriptor per
//! connection. Through nix's safe wrappers; nothing here is `unsafe`.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Makes the process non-dumpable (no core, no ptrace or `/proc/PID/mem`
/// by processes of the same uid) and disables core dumps; raises the
/// open-file soft limit to the hard one. Failures are logged, not fatal:
/// under the shipped unit systemd has set the limits already and its
/// system call filter refuses setrlimit (@resources).
pub(crate) fn apply() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("failed to make the process non-dumpable: {e}");
    }
    no_core_dumps();
    raise_open_files();
}

fn no_core_dumps() {
    // Only asked when needed: LimitCORE=0 in the unit already holds.
    if matches!(getrlimit(Resource::RLIMIT_CORE), Ok((_, 0))) {
        return;
    }
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!("failed to disable core dumps: {e}");
    }
}

/// Every connection is a file descriptor, and the soft limit systemd and
/// shells give (1024) is below the default `max_connections` plus what
/// the issuer connections need; the hard limit is ours to take.
fn raise_open_files() {
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("failed to raise the open-file limit: {e}");
            }
        }
    }
}
