//! Who is calling: the credentials the kernel recorded when the caller
//! connected, and the pure decision whether they may read a key.
//!
//! Identity comes only from `SO_PEERCRED` and `SO_PEERGROUPS`, never from
//! a PID lookup in /proc, which a caller could race with PID reuse. They
//! are read once per connection, on the runtime (two getsockopt calls);
//! user and group names, which may read /etc or ask NSS, only when an
//! allow list names someone, and off the runtime ([`Caller::resolve_names`]).
//!
//! The caller's executable ([`Process`]: `/proc/<pid>/exe` and `comm`) is
//! for the audit log only and decides nothing: the pid may have been reused
//! by the time it is read, and a process sets its own `comm`. It is read at
//! most once per connection, the first time a line about it is written
//! ([`Caller::process`]), so connections whose events are all counted
//! repeats cost no /proc reads.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::OnceLock;

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::Acl;
use crate::printable::shown;

/// A connected caller as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// For log lines only: a PID can be reused, so it decides nothing.
    pub(crate) pid: Option<i32>,
    /// The primary group and every supplementary group.
    pub(crate) gids: Vec<u32>,
    /// The user name of `uid`, when the system knows one (and names were
    /// looked up).
    pub(crate) user: Option<String>,
    /// The names of `gids` the system knows (when names were looked up).
    pub(crate) groups: Vec<String>,
    /// Whether `user` and `groups` were looked up.
    pub(crate) named: bool,
    /// Filled by [`Caller::process`], the first time it is asked for.
    pub(crate) process: OnceLock<Process>,
}

/// What /proc said about the caller's process, for log lines only: a pid
/// can be reused, so this is informational. [`UNKNOWN`] where it could not
/// be read (the process is gone, or /proc hides it from tokend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Process {
    /// The target of `/proc/<pid>/exe`, named by whoever named the file,
    /// made safe by [`shown`].
    pub(crate) exe: String,
    /// `/proc/<pid>/comm` without its newline, chosen by the process
    /// itself, made safe by [`shown`].
    pub(crate) comm: String,
}

/// Stands for a value /proc would not give.
pub(crate) const UNKNOWN: &str = "?";

/// The most characters of an executable's path a log line shows. Paths can
/// be 4,096 bytes long and are the caller's choice: a line stays readable,
/// and a caller cannot make every line about it that long.
const MAX_EXE_CHARS: usize = 256;
/// `comm` is at most 15 bytes (the kernel's TASK_COMM_LEN, 16 with its
/// NUL); the bound is a second line of defence, not the usual case.
const MAX_COMM_CHARS: usize = 16;

impl Process {
    /// Reads `/proc/<pid>/exe` and `/proc/<pid>/comm`; what cannot be read
    /// is [`UNKNOWN`], never an error: the caller's request does not
    /// depend on it. Two small reads of kernel memory, no disk or network,
    /// so it runs on the runtime's worker.
    fn read(pid: Option<i32>) -> Process {
        let Some(pid) = pid else {
            return Process::unknown();
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|path| shown(&path.to_string_lossy(), MAX_EXE_CHARS))
            .unwrap_or_else(|_| UNKNOWN.to_owned());
        let comm = read_comm(pid)
            .map(|bytes| {
                let text = String::from_utf8_lossy(&bytes);
                shown(text.strip_suffix('\n').unwrap_or(&text), MAX_COMM_CHARS)
            })
            .unwrap_or_else(|_| UNKNOWN.to_owned());
        Process { exe, comm }
    }

    fn unknown() -> Process {
        Process {
            exe: UNKNOWN.to_owned(),
            comm: UNKNOWN.to_owned(),
        }
    }
}

/// `/proc/<pid>/comm` in one read into a small buffer: it holds at most
/// 15 bytes and a newline, and `std::fs::read` would first ask for the
/// file's size, which /proc does not know. About 20 µs for both reads on a
/// 2-core VM, paid once per connection that has a line written.
fn read_comm(pid: i32) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::File::open(format!("/proc/{pid}/comm"))?;
    let mut buf = [0u8; 64];
    let n = file.read(&mut buf)?;
    Ok(buf[..n].to_vec())
}

impl Caller {
    /// Looks up the names of `uid` and `gids`. Blocking: may read /etc or
    /// ask NSS (LDAP, sssd), so call it off the async runtime's workers.
    pub(crate) fn resolve_names(&mut self) {
        self.user = User::from_uid(Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        self.groups = self
            .gids
            .iter()
            .filter_map(|&g| Group::from_gid(Gid::from_raw(g)).ok().flatten())
            .map(|g| g.name)
            .collect();
        self.named = true;
    }

    /// The caller's executable, read from /proc the first time it is asked
    /// for on this connection and kept for the rest of it.
    pub(crate) fn process(&self) -> &Process {
        self.process.get_or_init(|| Process::read(self.pid))
    }
}

/// May `caller` read a key guarded by `acl`? An empty list allows nobody,
/// root included.
#[must_use]
pub(crate) fn allow(caller: &Caller, acl: &Acl) -> bool {
    acl.uids.contains(&caller.uid)
        || caller
            .user
            .as_ref()
            .is_some_and(|name| acl.users.contains(name))
        || caller.groups.iter().any(|name| acl.groups.contains(name))
}

/// Reads the peer's credentials from a connected Unix stream, without
/// names ([`Caller::resolve_names`] adds them).
pub(crate) fn credentials(socket: &impl AsFd) -> io::Result<Caller> {
    let cred = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    let fd = socket.as_fd().as_raw_fd();
    let (uid, gid) = (cred.uid(), cred.gid());
    let mut gids = peer_groups(fd)?;
    gids.push(gid);
    gids.sort_unstable();
    gids.dedup();
    Ok(Caller {
        uid,
        gid,
        pid: (cred.pid() > 0).then_some(cred.pid()),
        gids,
        user: None,
        groups: Vec::new(),
        named: false,
        process: OnceLock::new(),
    })
}

/// The supplementary groups the peer had when it connected (Linux 4.13+).
fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    const GID_SIZE: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    // The kernel caps supplementary groups at NGROUPS_MAX (65536), so one
    // retry with the size it reports is enough; three bound the loop anyway.
    for _ in 0..3 {
        let mut len = (groups.len() * GID_SIZE) as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `len` bytes that the kernel
        // fills with gid_t values and `len` reports how many bytes it wrote.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / GID_SIZE);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        groups.resize(len as usize / GID_SIZE + 1, 0);
    }
    Err(io::Error::other("SO_PEERGROUPS kept growing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, user: Option<&str>, groups: &[&str]) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: Some(1),
            gids: vec![uid],
            user: user.map(str::to_owned),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            named: true,
            process: OnceLock::new(),
        }
    }

    fn acl(uids: &[u32], users: &[&str], groups: &[&str]) -> Acl {
        Acl {
            uids: uids.to_vec(),
            users: users.iter().map(|u| u.to_string()).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn empty_acl_allows_nobody_not_even_root() {
        assert!(!allow(&caller(0, Some("root"), &["root"]), &Acl::default()));
    }

    #[test]
    fn each_list_grants_on_its_own() {
        let alice = caller(1001, Some("alice"), &["alice", "billing"]);
        assert!(allow(&alice, &acl(&[1001], &[], &[])));
        assert!(allow(&alice, &acl(&[], &["alice"], &[])));
        assert!(allow(&alice, &acl(&[], &[], &["billing"])));
        assert!(!allow(&alice, &acl(&[1002], &["bob"], &["ops"])));
    }

    #[test]
    fn unnamed_caller_is_matched_by_uid_only() {
        let ghost = caller(4242, None, &[]);
        assert!(!allow(&ghost, &acl(&[], &["4242"], &["4242"])));
        assert!(allow(&ghost, &acl(&[4242], &[], &[])));
    }

    #[test]
    fn identifies_the_peer_of_a_socketpair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut me = credentials(&a).unwrap();
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert_eq!(me.pid, Some(std::process::id() as i32));
        assert!(me.gids.contains(&nix::unistd::getgid().as_raw()));
        assert!(!me.named && me.user.is_none());
        me.resolve_names();
        assert!(me.named);
        assert_eq!(
            me.user.is_some(),
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn reads_its_own_process_when_asked_and_nothing_without_a_pid() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = credentials(&a).unwrap();
        assert!(me.process.get().is_none(), "not read until asked");
        let exe = std::env::current_exe().unwrap();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(me.process().exe, exe.to_string_lossy());
        assert_eq!(me.process().comm, comm.trim_end_matches('\n'));
        let nobody = caller(1, None, &[]);
        let nobody = Caller {
            pid: None,
            ..nobody
        };
        assert_eq!(nobody.process(), &Process::unknown());
    }
}
