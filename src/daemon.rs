//! `tokend serve`: puts the pieces together and runs them until a signal,
//! reloading the configuration on SIGHUP.
//!
//! Start-up order matters: the configuration and secrets are validated
//! before the socket exists, the socket is listening before prefetch starts
//! and before systemd hears `READY=1` (a slow issuer must not hold up boot
//! or callers of other keys), and on shutdown the socket file goes last,
//! after every answer in flight was written. A socket systemd passed is
//! neither bound nor removed here: it is systemd's.
//!
//! A reload builds a whole new [`Service`] beside the running one and swaps
//! it in; handlers pick up the current one per request, so connections stay
//! open across a reload. Logging is [`crate::logging`]'s, process hardening
//! [`crate::hardening`]'s.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::cache::TokenCache;
use crate::config::{self, Config, DaemonConfig};
use crate::hardening;
use crate::issuer::IssuerClient;
use crate::logging::Logging;
use crate::server::{self, Limits, Listener};
use crate::service::{ReloadAsked, Service};
use crate::systemd::{self, Notifier};

/// From the stop signal to the moment gets still waiting on an issuer are
/// answered `unavailable`.
const ANSWER_DEADLINE: Duration = Duration::from_millis(3500);
/// From the stop signal to giving up on connections that will not finish
/// (a caller that does not read its answer). Under the 5 s we promise.
const DRAIN_DEADLINE: Duration = Duration::from_millis(4500);
/// After the drain deadline, how long abandoned handlers get to close their
/// connections (they only have to notice); still under the 5 s.
const ABANDON_GRACE: Duration = Duration::from_millis(250);
/// How often the STATUS= line is recomputed (and sent when it changed).
/// Cheap: a summary takes each cache lock once, briefly.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How long a reload may take to read the configuration and its secret
/// files. Past it (a hung network mount), the reload fails like an invalid
/// one and the running configuration stays.
const RELOAD_READ_LIMIT: Duration = Duration::from_secs(5);

pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = config::load_serving(config_path)?;
    let logging = Logging::init(config.daemon.log_level);
    for (name, key) in &config.keys {
        if let Some(why) = &key.unusable {
            tracing::error!(
                key = %name,
                "key {name:?} is unusable until a reload: {why}; serving the other keys"
            );
        }
    }
    // Watched before anything is announced: the default action of each of
    // these signals would kill the daemon.
    let mut signals = Signals::new()?;
    hardening::apply();
    let notifier = Arc::new(Notifier::from_env());

    let socket = Socket::open(&config.daemon)?;

    let shutdown = CancellationToken::new();
    let deadline = CancellationToken::new();
    let abandon = CancellationToken::new();
    let tasks = TaskTracker::new();
    let issuer = IssuerClient::new().context("failed to set up the HTTP client")?;
    let config = Arc::new(config);
    let cache = TokenCache::new(&config, issuer.clone(), tasks.clone(), deadline.clone());
    let limits = Limits::from(&config.daemon);
    // Reloads asked over the socket (`tokend reload`, systemd's
    // ExecReload=) queue here; the signal loop below runs them.
    let (reload_requests, mut asked_reloads) = mpsc::channel(4);
    let audit = Arc::new(Audit::new());
    let service = Arc::new(
        Service::new(config.clone(), cache, deadline.clone(), audit.clone())
            .with_reloads(reload_requests.clone()),
    );
    let (current, services) = watch::channel(service.clone());
    let accept = tokio::spawn(
        Listener {
            listener: socket.listener,
            services: services.clone(),
            limits,
            shutdown: shutdown.clone(),
            abandon: abandon.clone(),
            connections: tasks.clone(),
        }
        .run(),
    );
    tracing::info!(socket = %socket.shown, keys = config.keys.len(), "listening");
    service.cache().prefetch();
    drop(service);

    let status = Arc::new(Status::new(notifier.clone(), services));
    notifier.notify(&status.ready()).await;
    let housekeeping = CancellationToken::new();
    // The audit log's summaries are written until after the drain, so the
    // counts of the last answers are in them too.
    let mut chores = vec![tokio::spawn(audit.clone().run(housekeeping.clone()))];
    if notifier.is_enabled() {
        if let Some(every) = systemd::watchdog_interval() {
            chores.push(tokio::spawn(pet_watchdog(
                notifier.clone(),
                every,
                housekeeping.clone(),
            )));
        }
        chores.push(tokio::spawn(status.clone().run(housekeeping.clone())));
    }

    let mut reloader = Reloader {
        path: config_path.to_owned(),
        current,
        running: config.daemon.clone(),
        issuer,
        tasks: tasks.clone(),
        deadline: deadline.clone(),
        notifier: notifier.clone(),
        status,
        logging,
        reload_requests,
        audit,
    };
    drop(config);
    let signal_name = loop {
        // A stop signal is acted on even while a reload is under way.
        tokio::select! {
            asked = signals.next() => match asked {
                Some(Asked::Reload) => tokio::select! {
                    _ = reloader.reload("SIGHUP received") => {}
                    name = signals.stop() => break name,
                },
                Some(Asked::Stop(name)) => break name,
                None => anyhow::bail!("signal handling ended unexpectedly"),
            },
            Some(reply) = asked_reloads.recv() => tokio::select! {
                outcome = reloader.reload("asked over the socket") => {
                    let _ = reply.send(outcome);
                }
                name = signals.stop() => break name,
            },
        }
    };

    tracing::info!("{signal_name} received: shutting down");
    notifier.notify(systemd::STOPPING).await;
    let stopping = tokio::time::Instant::now();
    shutdown.cancel();
    // Refreshers would otherwise keep the task tracker busy (and keep
    // retrying a failing issuer) until the deadline.
    reloader.current.borrow().cache().stop();
    let answer_deadline = deadline.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ANSWER_DEADLINE).await;
        answer_deadline.cancel();
    });
    let _ = accept.await;
    tasks.close();
    if tokio::time::timeout_at(stopping + DRAIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish in time; closing them");
        // Handlers blocked writing to callers that do not read close their
        // connections now instead of waiting out `request_timeout_client`.
        abandon.cancel();
        let _ = tokio::time::timeout(ABANDON_GRACE, tasks.wait()).await;
    }
    deadline.cancel();
    housekeeping.cancel();
    for chore in chores {
        let _ = chore.await;
    }
    if let Some(path) = socket.owned {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(socket = %path.display(), "failed to remove the socket: {e}");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The listening socket: the one systemd passed, or one bound here.
struct Socket {
    listener: tokio::net::UnixListener,
    /// The file to remove at shutdown: only one tokend bound itself.
    owned: Option<PathBuf>,
    /// Where it is, for the log.
    shown: String,
}

impl Socket {
    fn open(daemon: &DaemonConfig) -> anyhow::Result<Socket> {
        if let Some(passed) = systemd::listener()? {
            let shown = systemd::listener_path(&passed);
            tracing::info!(socket = %shown, "using the socket systemd passed");
            let listener = tokio::net::UnixListener::from_std(passed)
                .context("failed to register the socket systemd passed")?;
            return Ok(Socket {
                listener,
                owned: None,
                shown,
            });
        }
        Ok(Socket {
            listener: server::bind(
                &daemon.socket,
                daemon.socket_mode,
                daemon.socket_group.as_deref(),
            )?,
            owned: Some(daemon.socket.clone()),
            shown: daemon.socket.display().to_string(),
        })
    }
}

/// What a signal asks for.
enum Asked {
    Reload,
    Stop(&'static str),
}

/// SIGHUP, SIGTERM and SIGINT, watched from start-up on.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("failed to watch SIGHUP")?,
            term: signal(SignalKind::terminate()).context("failed to watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("failed to watch SIGINT")?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    async fn next(&mut self) -> Option<Asked> {
        tokio::select! {
            s = self.hup.recv() => s.map(|()| Asked::Reload),
            s = self.term.recv() => s.map(|()| Asked::Stop("SIGTERM")),
            s = self.int.recv() => s.map(|()| Asked::Stop("SIGINT")),
        }
    }
}

/// Owns reloading: the path to re-read, the slot the current [`Service`]
/// lives in, and what a new cache is built from.
struct Reloader {
    path: PathBuf,
    current: watch::Sender<Arc<Service>>,
    /// The `[daemon]` settings in force: the socket and the limits were set
    /// up at start and stay until a restart.
    running: DaemonConfig,
    issuer: IssuerClient,
    tasks: TaskTracker,
    deadline: CancellationToken,
    notifier: Arc<Notifier>,
    status: Arc<Status>,
    logging: Logging,
    /// Handed to every new service, so it can pass reload requests on.
    reload_requests: mpsc::Sender<ReloadAsked>,
    /// Handed to every new service: the audit log outlives reloads.
    audit: Arc<Audit>,
}

impl Reloader {
    /// Re-reads the configuration and its secret files; swaps in a new
    /// service when they are valid, keeps the running one when not. Either
    /// way systemd hears `READY=1` at the end. Returns the number of keys
    /// now configured, or why the reload was refused.
    async fn reload(&mut self, why: &str) -> Result<usize, String> {
        tracing::info!(config = %self.path.display(), "{why}: reloading");
        self.notifier.notify(&systemd::reloading()).await;
        let path = self.path.clone();
        let loading = tokio::task::spawn_blocking(move || config::load(&path));
        let outcome = match tokio::time::timeout(RELOAD_READ_LIMIT, loading).await {
            Ok(Ok(Ok(config))) => Ok(self.swap(config)),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "{} and its secret files could not be read within {} (a hung mount?)",
                self.path.display(),
                humantime::format_duration(RELOAD_READ_LIMIT)
            )),
        };
        if let Err(e) = &outcome {
            tracing::error!("reload failed; still serving the previous configuration: {e}");
        }
        self.status.reload_failed(outcome.as_ref().err().cloned());
        self.notifier.notify(&self.status.ready()).await;
        outcome
    }

    /// Swaps in a service for `config`; returns its number of keys.
    fn swap(&mut self, config: Config) -> usize {
        self.warn_restart_needed(&config.daemon);
        self.logging.set_level(config.daemon.log_level);
        let config = Arc::new(config);
        let cache = TokenCache::new(
            &config,
            self.issuer.clone(),
            self.tasks.clone(),
            self.deadline.clone(),
        );
        let old = self.current.borrow().clone();
        let carried = cache.adopt(old.cache());
        old.cache().stop();
        let service = Arc::new(
            Service::new(
                config.clone(),
                cache,
                self.deadline.clone(),
                self.audit.clone(),
            )
            .with_reloads(self.reload_requests.clone()),
        );
        // From here on every request, on new connections and open ones
        // alike, is answered by the new service; requests already in
        // progress finish on the old one.
        self.current.send_replace(service.clone());
        service.cache().prefetch();
        tracing::info!(keys = config.keys.len(), carried, "reloaded");
        config.keys.len()
    }

    fn warn_restart_needed(&self, new: &DaemonConfig) {
        let old = &self.running;
        let changed: Vec<&str> = [
            ("socket", old.socket != new.socket),
            ("socket_mode", old.socket_mode != new.socket_mode),
            ("socket_group", old.socket_group != new.socket_group),
            (
                "max_connections",
                old.max_connections != new.max_connections,
            ),
            (
                "max_connections_per_uid",
                old.max_connections_per_uid != new.max_connections_per_uid,
            ),
            ("idle_timeout", old.idle_timeout != new.idle_timeout),
            (
                "request_timeout_client",
                old.request_timeout_client != new.request_timeout_client,
            ),
            (
                "max_request_bytes",
                old.max_request_bytes != new.max_request_bytes,
            ),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect();
        if !changed.is_empty() {
            tracing::warn!(
                "[daemon] {} changed in {}; that takes a restart (systemctl restart tokend), \
                 a reload keeps the running values",
                changed.join(", "),
                self.path.display()
            );
        }
    }
}

/// The STATUS= line systemd shows: the current cache in numbers, and the
/// last reload's error until a reload succeeds.
struct Status {
    notifier: Arc<Notifier>,
    services: watch::Receiver<Arc<Service>>,
    reload_error: Mutex<Option<String>>,
    /// The last line sent, so an unchanged one is not sent again.
    sent: Mutex<String>,
}

impl Status {
    fn new(notifier: Arc<Notifier>, services: watch::Receiver<Arc<Service>>) -> Status {
        Status {
            notifier,
            services,
            reload_error: Mutex::default(),
            sent: Mutex::default(),
        }
    }

    fn line(&self) -> String {
        let service = self.services.borrow().clone();
        let mut line = systemd::status_line(&service.cache().summary());
        if let Some(error) = &*lock(&self.reload_error) {
            line.push_str("; last reload failed: ");
            line.push_str(error);
        }
        // One assignment per line in the protocol: a newline would end it.
        line.replace('\n', " ")
    }

    fn reload_failed(&self, error: Option<String>) {
        *lock(&self.reload_error) = error;
    }

    /// `READY=1` with the current status line.
    fn ready(&self) -> String {
        let line = self.line();
        *lock(&self.sent) = line.clone();
        systemd::ready(&line)
    }

    /// Recomputes the line every [`STATUS_EVERY`] and sends it when it
    /// changed.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(STATUS_EVERY) => {}
                () = stop.cancelled() => return,
            }
            let line = self.line();
            let changed = {
                let mut sent = lock(&self.sent);
                let changed = *sent != line;
                if changed {
                    sent.clone_from(&line);
                }
                changed
            };
            if changed {
                self.notifier.notify(&format!("STATUS={line}")).await;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data here (a line of text) stays valid whatever a panicking
    // holder did.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends `WATCHDOG=1` every `every` from the runtime that serves requests,
/// so a daemon whose runtime is wedged stops petting and systemd restarts it.
async fn pet_watchdog(notifier: Arc<Notifier>, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => notifier.notify(systemd::WATCHDOG).await,
            () = stop.cancelled() => return,
        }
    }
}
