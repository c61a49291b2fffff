//! A stand-in for tokend on a Unix socket, for the CLI's side of the
//! protocol: `--socket` and `TOKEND_SOCKET` may point at any program, so
//! `tokend get`, `status` and the others must hold against a peer that
//! answers what no tokend would (control characters, forged lines) or
//! answers a byte at a time and never finishes.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// What the stand-in does once it has read a request line.
#[derive(Clone)]
pub enum Behaviour {
    /// Writes the line `answer(request)` returns, `\n` added, and closes.
    Answer(Arc<dyn Fn(&serde_json::Value) -> String + Send + Sync>),
    /// Writes a space (JSON whitespace: still the start of an answer)
    /// every interval, forever.
    Drip(Duration),
}

/// The stand-in: it serves every connection until dropped.
pub struct FakeDaemon {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    server: JoinHandle<()>,
}

impl FakeDaemon {
    /// Answers each request with `answer(request)`, the request parsed as
    /// JSON.
    pub fn answering(
        answer: impl Fn(&serde_json::Value) -> String + Send + Sync + 'static,
    ) -> FakeDaemon {
        FakeDaemon::start(Behaviour::Answer(Arc::new(answer)))
    }

    /// Answers each request one space every `interval`, never a whole line.
    pub fn dripping(interval: Duration) -> FakeDaemon {
        FakeDaemon::start(Behaviour::Drip(interval))
    }

    /// Binds in a new temporary directory; needs a tokio runtime.
    pub fn start(behaviour: Behaviour) -> FakeDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake daemon's socket");
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, behaviour.clone()));
            }
        });
        FakeDaemon {
            socket,
            _dir: dir,
            server,
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(stream: tokio::net::UnixStream, behaviour: Behaviour) {
    let (read, mut write) = stream.into_split();
    let mut request = String::new();
    if BufReader::new(read).read_line(&mut request).await.is_err() {
        return;
    }
    match behaviour {
        Behaviour::Answer(answer) => {
            let request = serde_json::from_str(&request).unwrap_or(serde_json::Value::Null);
            let line = answer(&request) + "\n";
            let _ = write.write_all(line.as_bytes()).await;
        }
        Behaviour::Drip(interval) => loop {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        },
    }
}

/// A socket whose listener never accepts and whose backlog is full: a
/// connect to it waits (in the kernel) until a place frees, which none
/// does, as with a daemon that stopped accepting.
pub struct FullBacklog {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    _listener: std::os::fd::OwnedFd,
    _held: Vec<std::os::fd::OwnedFd>,
}

impl FullBacklog {
    pub fn start() -> FullBacklog {
        use nix::sys::socket::{
            bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("temp dir");
        let socket_path = dir.path().join("full.sock");
        let address = UnixAddr::new(&socket_path).expect("socket address");
        let stream = || {
            socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .expect("socket")
        };
        let listener = stream();
        bind(listener.as_raw_fd(), &address).expect("bind");
        listen(&listener, Backlog::new(0).expect("backlog 0")).expect("listen");
        let mut held = Vec::new();
        loop {
            let fd = stream();
            match connect(fd.as_raw_fd(), &address) {
                Ok(()) => held.push(fd),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
            assert!(held.len() < 64, "the backlog does not fill");
        }
        FullBacklog {
            socket: socket_path,
            _dir: dir,
            _listener: listener,
            _held: held,
        }
    }
}
