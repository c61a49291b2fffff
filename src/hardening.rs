//! Process hardening at start-up: keeping secrets out of core dumps and
//! away from same-uid debuggers, and room for one file descriptor per
//! connection. Through nix's safe wrappers; nothing here is `unsafe`.
//!
//! It comes first, before the configuration is read: the configuration may
//! hold an inline secret, and anything read while the process is still
//! dumpable can be read back by any process of the same uid (ptrace,
//! `/proc/PID/mem`) or land in a core file. Logging is set up from the
//! configuration, so what fails here is returned, to be logged once it is.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// A step of hardening that failed. None is fatal: under the shipped unit
/// systemd has set the limits already and its system call filter refuses
/// setrlimit (@resources).
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    #[error("failed to make the process non-dumpable: {0}")]
    Dumpable(nix::Error),
    #[error("failed to disable core dumps: {0}")]
    CoreDumps(nix::Error),
    #[error("failed to raise the open-file limit: {0}")]
    OpenFiles(nix::Error),
}

/// Everything the daemon needs: [`protect_secrets`], and the open-file
/// soft limit raised to the hard one.
pub fn apply() -> Vec<HardeningError> {
    let mut failed = protect_secrets();
    failed.extend(raise_open_files().err());
    failed
}

/// Makes the process non-dumpable (no core, no ptrace or `/proc/PID/mem`
/// by processes of the same uid) and disables core dumps. For every
/// program that reads secrets: `tokend check` reads the same ones the
/// daemon does.
pub fn protect_secrets() -> Vec<HardeningError> {
    let mut failed = Vec::new();
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        failed.push(HardeningError::Dumpable(e));
    }
    failed.extend(no_core_dumps().err());
    failed
}

fn no_core_dumps() -> Result<(), HardeningError> {
    // Only asked when needed: LimitCORE=0 in the unit already holds.
    if matches!(getrlimit(Resource::RLIMIT_CORE), Ok((_, 0))) {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(HardeningError::CoreDumps)
}

/// Every connection is a file descriptor, and the soft limit systemd and
/// shells give (1024) is below the default `max_connections` plus what
/// the issuer connections need; the hard limit is ours to take.
fn raise_open_files() -> Result<(), HardeningError> {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(HardeningError::OpenFiles)
        }
        _ => Ok(()),
    }
}
