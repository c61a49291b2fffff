//! Connections made by another uid: a forked child drops to that uid,
//! connects to the daemon's socket `n` times and passes each connected
//! socket back over a socketpair (SCM_RIGHTS). The kernel records the
//! child's credentials at connect time, so the daemon sees a real foreign
//! caller, while the test holds and drives the sockets itself.
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `n` connections to `socket` made under `uid`/`gid`/`groups`.
pub fn connect_as(
    socket: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    n: usize,
) -> Vec<tokio::net::UnixStream> {
    let addr = sockaddr(socket);
    let mut pair = [0 as RawFd; 2];
    // SAFETY: socketpair fills the two-element array it is given.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: the child calls only async-signal-safe functions on memory
    // prepared before the fork, then _exits; the parent goes on normally.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above.
        unsafe { child(pair[1], &addr, uid, gid, &groups, n) }
    }
    // SAFETY: closing our copy of the child's end.
    unsafe { libc::close(pair[1]) };
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let fd = receive_fd(pair[0])
            .unwrap_or_else(|e| panic!("connection {i} of {n} as uid {uid}: {e}"));
        // SAFETY: the fd was just received and is owned by nobody else.
        let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        std.set_nonblocking(true).expect("nonblocking");
        streams.push(tokio::net::UnixStream::from_std(std).expect("register"));
    }
    let mut status = 0;
    // SAFETY: reaping our own child; closing our end of the pair.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
        libc::close(pair[0]);
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status}"
    );
    streams
}

fn sockaddr(path: &Path) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    addr
}

/// Runs in the forked child: no allocation, no locks, only syscalls.
unsafe fn child(
    channel: RawFd,
    addr: &libc::sockaddr_un,
    uid: u32,
    gid: u32,
    groups: &[libc::gid_t],
    n: usize,
) -> ! {
    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
        || libc::setgid(gid) != 0
        || libc::setuid(uid) != 0
    {
        libc::_exit(2);
    }
    for _ in 0..n {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            libc::_exit(3);
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), len) != 0 {
            libc::_exit(4);
        }
        if send_fd(channel, fd) != 0 {
            libc::_exit(5);
        }
        libc::close(fd);
    }
    libc::_exit(0)
}

/// Room for one control message carrying one fd, suitably aligned.
#[repr(C, align(8))]
struct FdMessage([u8; 32]);

unsafe fn send_fd(channel: RawFd, fd: RawFd) -> i32 {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = FdMessage([0; 32]);
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    if libc::sendmsg(channel, &msg, 0) == 1 {
        0
    } else {
        -1
    }
}

pub fn receive_fd(channel: RawFd) -> io::Result<RawFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = FdMessage([0; 32]);
    // SAFETY: msghdr is plain data; the buffers it points to outlive the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        let got = libc::recvmsg(channel, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if got == 0 || cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::other("the child sent no socket"));
        }
        Ok(std::ptr::read_unaligned(
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
        ))
    }
}
