//! Holds a child process at a system call, to look at it there: the child
//! asks to be traced before it execs, and [`Traced::run_until_open`] lets
//! it run one system call at a time until its main thread is about to open
//! a given path, or until a condition holds. That is how a test sees the
//! state a daemon is in when it opens a file, with no pause written into
//! the daemon for it.
//!
//! ptrace lets only the thread that spawned the child trace it, so a
//! [`Traced`] is driven from that thread, synchronously. Only the main
//! thread is traced: threads the child starts later run freely.
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// A child stopped under ptrace, until [`Traced::release`].
pub struct Traced {
    /// Until [`Traced::release`] hands it over.
    child: Option<Child>,
    pid: libc::pid_t,
}

impl Traced {
    /// Spawns `command` traced; it is held at its first instruction.
    pub fn spawn(mut command: Command) -> Traced {
        // SAFETY: ptrace(PTRACE_TRACEME) is a bare system call on no
        // memory of ours; it runs in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let null = std::ptr::null_mut::<libc::c_void>();
                if libc::ptrace(libc::PTRACE_TRACEME, 0, null, null) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn the traced child");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        let traced = Traced {
            child: Some(child),
            pid,
        };
        let status = traced.wait();
        assert!(
            libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP,
            "the child did not stop at exec: status {status:#x}"
        );
        // System-call stops marked as such; the child dies with the test.
        let options = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;
        traced.request(libc::PTRACE_SETOPTIONS, 0, options as usize);
        traced
    }

    /// Runs the child until its main thread is about to open one of
    /// `paths` (spelled as the child spells them) and returns that path,
    /// the child stopped there before the kernel has opened anything. Or,
    /// when `settled` holds at an `openat` first, returns `None`, the child
    /// stopped at that one. `settled` is asked at each `openat` before its
    /// path is read: once the child has made itself non-dumpable, only a
    /// tracer with CAP_SYS_PTRACE may read its memory. Panics if the child
    /// exits first.
    pub fn run_until_open(
        &mut self,
        paths: &[&Path],
        settled: impl Fn(libc::pid_t) -> bool,
    ) -> Option<PathBuf> {
        let mut signal = 0;
        loop {
            self.request(libc::PTRACE_SYSCALL, 0, signal);
            let status = self.wait();
            assert!(
                libc::WIFSTOPPED(status),
                "the child ended (status {status:#x}) before it opened any of {paths:?}"
            );
            let stop = libc::WSTOPSIG(status);
            if stop == libc::SIGTRAP | 0x80 {
                signal = 0;
                let Some(path_at) = self.entering_openat() else {
                    continue;
                };
                if settled(self.pid) {
                    return None;
                }
                let opened = self.string_at(path_at, 4096);
                if let Some(path) = paths.iter().find(|p| p.as_os_str().as_bytes() == opened) {
                    return Some(path.to_path_buf());
                }
                continue;
            }
            // The SIGTRAP of a further exec (tokend runs tokend-daemon)
            // is ptrace's own; any other signal is the child's to get.
            signal = if stop == libc::SIGTRAP {
                0
            } else {
                stop as usize
            };
        }
    }

    /// Lets the child run on, no longer traced.
    pub fn release(mut self) -> Child {
        self.request(libc::PTRACE_DETACH, 0, 0);
        self.child.take().expect("released once")
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The address of the path, when the child is stopped entering
    /// `openat`.
    fn entering_openat(&self) -> Option<u64> {
        // SAFETY: all zeroes is a valid ptrace_syscall_info (plain data).
        let mut info: libc::ptrace_syscall_info = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::ptrace_syscall_info>();
        // SAFETY: the kernel writes at most `size` bytes into `info`.
        let got = unsafe {
            libc::ptrace(
                libc::PTRACE_GET_SYSCALL_INFO,
                self.pid,
                size as *mut libc::c_void,
                std::ptr::addr_of_mut!(info).cast::<libc::c_void>(),
            )
        };
        assert!(
            got > 0,
            "PTRACE_GET_SYSCALL_INFO: {}",
            io::Error::last_os_error()
        );
        if info.op != libc::PTRACE_SYSCALL_INFO_ENTRY {
            return None;
        }
        // SAFETY: `op` says the entry member is the one filled in.
        let entry = unsafe { info.u.entry };
        (entry.nr == libc::SYS_openat as u64).then_some(entry.args[1])
    }

    /// The NUL-terminated string at `addr` in the child, read a word at a
    /// time, cut after `max` bytes.
    fn string_at(&self, addr: u64, max: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut at = addr as usize;
        while bytes.len() <= max {
            // SAFETY: errno is thread-local; cleared to tell a word of all
            // ones from an error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: PEEKDATA reads the child's memory, not ours.
            let word = unsafe {
                libc::ptrace(
                    libc::PTRACE_PEEKDATA,
                    self.pid,
                    at as *mut libc::c_void,
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            let err = io::Error::last_os_error();
            assert!(
                !(word == -1 && err.raw_os_error() != Some(0)),
                "PTRACE_PEEKDATA: {err}"
            );
            for byte in word.to_ne_bytes() {
                if byte == 0 {
                    return bytes;
                }
                bytes.push(byte);
            }
            at += std::mem::size_of::<libc::c_long>();
        }
        bytes
    }

    fn request(&self, request: libc::c_uint, addr: usize, data: usize) {
        // SAFETY: these requests take plain numbers, not pointers into us.
        let done = unsafe {
            libc::ptrace(
                request,
                self.pid,
                addr as *mut libc::c_void,
                data as *mut libc::c_void,
            )
        };
        assert!(
            done != -1,
            "ptrace request {request}: {}",
            io::Error::last_os_error()
        );
    }

    fn wait(&self) -> libc::c_int {
        let mut status = 0;
        // SAFETY: waiting for our own child, into a local.
        let got = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(got, self.pid, "waitpid: {}", io::Error::last_os_error());
        status
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // Never released (the test is failing): PTRACE_O_EXITKILL would end
        // it with us, but not before the test process exits.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
