//! tokend holds OAuth 2.0 client credentials, keeps an access token fresh for
//! every configured key and scope set, and hands tokens to local processes
//! over a permission-checked Unix socket speaking line-delimited JSON.
//!
//! # Layout
//! - [`config`]: the TOML file into typed, validated settings.
//! - [`secret`]: client secrets and access tokens, wiped on drop, redacted in `Debug`.
//! - [`secret_file`]: reading the configuration and the files it names: who else may read them, and who else could change or replace them.
//! - [`assertion`]: signed client assertions for `auth = "private_key_jwt"`.
//! - [`scope`]: canonical scope sets.
//! - [`issuer`]: the token-endpoint client and the parser of its answers.
//! - [`scrub`]: finding a secret in issuer or proxy text, in any encoding that decodes to it.
//! - [`discovery`]: from a key's `issuer` to its token endpoint (RFC 8414, OIDC Discovery), cached per key.
//! - [`transport`]: trust anchors (`ca_file`, system store, bundled roots), proxies, mTLS identities, one HTTP client per distinct combination, TLS failures in words.
//! - [`cache`]: one token per (key, scope set), each kept fresh by its one owner task; per-key issuer budget.
//! - [`protocol`]: socket protocol v1, pure encode and decode.
//! - [`peer`]: the caller's kernel-recorded identity and the allow decision.
//! - [`printable`]: text others chose, as the log and the terminal show it: no control characters, no line of its own.
//! - [`service`]: what each request means for this caller.
//! - [`audit`]: the log of handouts, denials and reloads, and its bound on repeats.
//! - [`metrics`]: counters and gauges in the Prometheus text format, who may read them, and the HTTP `/metrics` endpoint.
//! - [`server`]: the socket, the accept loop, per-connection handlers and limits.
//! - [`unread`]: answer bytes held for callers that have not read them, per uid, and returning freed memory.
//! - [`shutdown`]: the two phases of a shutdown, as one value.
//! - [`daemon`]: `tokend serve`: start-up, signals, reload and shutdown.
//! - [`logging`]: journald or stderr, and the filter over both.
//! - [`hardening`]: no core dumps, no same-uid debuggers (before anything secret is read), room for connections.
//! - [`systemd`]: sd_notify, the watchdog, socket activation, journald detection.
//! - [`cli`]: the command line both programs parse, and the subcommands that only talk to a running daemon.
//! - [`client`]: the CLI's side of the socket (`get`, `reload`, `status`, `keys`, `metrics`).
//! - [`report`]: the tables and JSON `tokend status` and `tokend keys` print.
//!
//! # How a get flows
//! The [`server`]'s accept loop reads the caller's credentials from the
//! kernel once (`SO_PEERCRED`, `SO_PEERGROUPS`), checks the connection
//! limits, and hands the connection to a handler task. The handler reads one
//! bounded line at a time and asks the [`service`] in force (a reload swaps
//! it) to answer it: [`protocol::decode`] turns the line into a request,
//! [`peer::allow`] decides on the key's allow lists, the key's scope rule
//! picks the set ([`config::KeyConfig::effective_scopes`]), and the
//! [`cache`] is asked for that set's token. A usable token comes straight
//! from the entry's published snapshot; otherwise the get wakes the entry's
//! owner task, the only one that talks to the [`issuer`], and waits for its
//! answer. The [`audit`] log notes the handout (the first of its kind; repeats
//! are counted), and the answer is written into a buffer of its own (a token
//! straight from the cache's copy) that is wiped once the handler has
//! written it, within `request_timeout_client`; the answers to pipelined
//! requests already read go out together, in one `writev`, in batches
//! bounded in bytes per connection and per uid ([`unread`]).

pub mod assertion;
pub(crate) mod audit;
pub(crate) mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod hardening;
pub mod issuer;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod peer;
pub mod printable;
pub mod protocol;
pub mod report;
pub mod scope;
pub mod scrub;
pub mod secret;
pub mod secret_file;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod shutdown;
pub(crate) mod systemd;
pub mod transport;
pub(crate) mod unread;
