//! tokend holds OAuth 2.0 client credentials, keeps an access token fresh for
//! every configured key and scope set, and hands tokens to local processes
//! over a permission-checked Unix socket speaking line-delimited JSON.
//!
//! # Layout
//! - [`config`]: the TOML file into typed, validated settings.
//! - [`secret`]: client secrets and access tokens, wiped on drop, redacted in `Debug`.
//! - [`secret_file`]: reading files that hold secrets, and who else may read them.
//! - [`scope`]: canonical scope sets.
//! - [`issuer`]: the token-endpoint client and the parser of its answers.
//! - [`cache`]: one token per (key, scope set), each kept fresh by its one owner task; per-key issuer budget.
//! - [`protocol`]: socket protocol v1, pure encode and decode.
//! - [`peer`]: the caller's kernel-recorded identity and the allow decision.
//! - [`service`]: what each request means for this caller.
//! - [`audit`]: the log of handouts and denials, and its bound on repeats.
//! - [`server`]: the socket, the accept loop, per-connection handlers and limits.
//! - [`shutdown`]: the two phases of a shutdown, as one value.
//! - [`daemon`]: `tokend serve`: start-up, signals, reload and shutdown.
//! - [`logging`]: journald or stderr, and the filter over both.
//! - [`hardening`]: no core dumps, no same-uid debuggers, room for connections.
//! - [`systemd`]: sd_notify, the watchdog, socket activation, journald detection.
//! - [`client`]: `tokend get`'s side of the socket.

pub mod audit;
pub mod cache;
pub mod client;
pub mod config;
pub mod daemon;
pub mod hardening;
pub mod issuer;
pub mod logging;
pub mod peer;
pub mod protocol;
pub mod scope;
pub mod secret;
pub mod secret_file;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod systemd;
