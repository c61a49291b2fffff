//! `tokend serve`: puts the pieces together and runs them until a signal,
//! reloading the configuration on SIGHUP.
//!
//! Start-up order matters: the process is hardened before the
//! configuration or any secret is read, they are validated before the
//! socket exists, the socket is listening before prefetch starts
//! and before systemd hears `READY=1` (a slow issuer must not hold up boot
//! or callers of other keys), and on shutdown the socket file goes last,
//! after every answer in flight was written (a start that fails after
//! binding it removes it too). A socket systemd passed is neither bound nor
//! removed here: it is systemd's. The metrics endpoint is tried before
//! `READY=1` too, but its address being taken costs no token service: the
//! endpoint keeps trying on its own ([`crate::metrics::http`]).
//!
//! [`serve`] reads top to bottom: start-up, the signal loop, and shutdown
//! in a straight line through the two phases of one [`Shutdown`] (stop
//! taking work; at the answer deadline, give up what still waits), with the
//! server draining its own connections in between.
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

use crate::audit::{self, Audit, ReloadAsker, ReloadOutcome};
use crate::cache::{CacheSummary, TokenCache};
use crate::config::{self, Config, DaemonConfig};
use crate::hardening;
use crate::issuer::IssuerClient;
use crate::logging::Logging;
use crate::metrics;
use crate::metrics::http::health::Health;
use crate::metrics::http::Endpoint;
use crate::server::{self, Limits};
use crate::service::{ReloadAsked, Service};
use crate::shutdown::Shutdown;
use crate::systemd::{self, Notifier};

/// From the stop signal to the answer deadline: gets still waiting on an
/// issuer are answered `unavailable`, and connections that will not finish
/// (a caller that does not read its answer) are given up. The server needs
/// at most a quarter of a second more: the whole is under the 5 s we promise.
const ANSWER_DEADLINE: Duration = Duration::from_millis(3500);
/// The least time between two recomputations of the STATUS= line, so that
/// many sets refreshing together cost one summary, not one each.
const STATUS_GAP: Duration = Duration::from_secs(2);
/// How long a reload may take to read the configuration and its secret
/// files. Past it (a hung network mount), the reload fails like an invalid
/// one and the running configuration stays.
const RELOAD_READ_LIMIT: Duration = Duration::from_secs(5);

pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    // Before the configuration is read: it may hold an inline secret.
    let unhardened = hardening::apply();
    let config = config::load_serving(config_path)?;
    let logging = Logging::init(config.daemon.log_level);
    for failure in &unhardened {
        tracing::warn!("{failure}");
    }
    warn_unusable(&config);
    // Watched before anything is announced: the default action of each of
    // these signals would kill the daemon.
    let mut signals = Signals::new()?;
    let notifier = Arc::new(Notifier::from_env());
    // From here on, a failed start removes the socket file it made (see
    // `Socket`'s drop).
    let mut socket = Socket::open(&config.daemon)?;
    let metrics_endpoint = Endpoint::open(&config.daemon);
    let shutdown = Shutdown::new();
    // Reloads asked over the socket (`tokend reload`, systemd's
    // ExecReload=) queue here; the signal loop below runs them.
    let (reload_requests, mut asked_reloads) = mpsc::channel(4);
    let limits = Limits::from(&config.daemon);
    let mut reloader = Reloader::start(
        config_path,
        config,
        &shutdown,
        notifier.clone(),
        logging,
        reload_requests,
        metrics_endpoint.as_ref().map(Endpoint::health),
    )?;
    let server = tokio::spawn(server::run(
        socket
            .listener
            .take()
            .context("the socket was opened once")?,
        reloader.current.subscribe(),
        limits,
        shutdown.clone(),
    ));
    tracing::info!(socket = %socket.shown, keys = reloader.keys(), "listening");
    reloader.current.borrow().cache().prefetch();
    notifier.notify(&reloader.status.ready()).await;
    let chores = Chores::start(&notifier, &reloader, metrics_endpoint);

    let signal_name = run_until_stopped(&mut signals, &mut reloader, &mut asked_reloads).await?;

    tracing::info!("{signal_name} received: shutting down");
    notifier.notify(systemd::STOPPING).await;
    shutdown.begin();
    // Owners would otherwise keep refreshing (and retrying a failing
    // issuer) until the deadline.
    reloader.current.borrow().cache().stop();
    drain(server, &shutdown).await;
    chores.stop().await;
    socket.remove();
    tracing::info!("stopped");
    Ok(())
}

/// Reloads on SIGHUP or when asked over the socket, until SIGTERM or
/// SIGINT, whose name it returns. A stop signal is acted on even while a
/// reload is under way.
async fn run_until_stopped(
    signals: &mut Signals,
    reloader: &mut Reloader,
    asked_reloads: &mut mpsc::Receiver<ReloadAsked>,
) -> anyhow::Result<&'static str> {
    loop {
        tokio::select! {
            asked = signals.next() => match asked {
                Some(Asked::Reload) => tokio::select! {
                    outcome = reloader.reload("SIGHUP received") => {
                        let outcome = match outcome {
                            Ok(keys) => ReloadOutcome::Reloaded(keys),
                            Err(_) => ReloadOutcome::Failed,
                        };
                        audit::reloaded(ReloadAsker::Signal, outcome);
                    }
                    name = signals.stop() => return Ok(name),
                },
                Some(Asked::Stop(name)) => return Ok(name),
                None => anyhow::bail!("signal handling ended unexpectedly"),
            },
            Some(reply) = asked_reloads.recv() => tokio::select! {
                outcome = reloader.reload("asked over the socket") => {
                    let _ = reply.send(outcome);
                }
                name = signals.stop() => return Ok(name),
            },
        }
    }
}

/// Waits for the server to finish the answers in flight, and at the answer
/// deadline tells everything still waiting to give up.
async fn drain(mut server: tokio::task::JoinHandle<()>, shutdown: &Shutdown) {
    tokio::select! {
        _ = &mut server => return,
        () = tokio::time::sleep(ANSWER_DEADLINE) => {
            tracing::warn!("some connections did not finish in time; giving them up");
            shutdown.expire();
        }
    }
    let _ = server.await;
}

fn warn_unusable(config: &Config) {
    for (name, key) in &config.keys {
        if let Some(why) = &key.unusable {
            tracing::error!(
                key = %name,
                "key {name:?} is unusable until a reload: {why}; serving the other keys"
            );
        }
    }
}

/// What runs beside the server until it has drained: the audit log's
/// summaries (so the last answers are counted in them), the metrics
/// endpoint when configured (scrapes see the drain too), and under systemd
/// the watchdog and the STATUS= line.
struct Chores {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Chores {
    fn start(
        notifier: &Arc<Notifier>,
        reloader: &Reloader,
        metrics_endpoint: Option<Endpoint>,
    ) -> Chores {
        let stop = CancellationToken::new();
        let mut tasks = vec![tokio::spawn(reloader.audit.clone().run(stop.clone()))];
        if let Some(endpoint) = metrics_endpoint {
            let services = reloader.current.subscribe();
            tasks.push(tokio::spawn(endpoint.run(services, stop.clone())));
        }
        if notifier.is_enabled() {
            if let Some(every) = systemd::watchdog_interval() {
                tasks.push(tokio::spawn(pet_watchdog(
                    notifier.clone(),
                    every,
                    stop.clone(),
                )));
            }
            tasks.push(tokio::spawn(reloader.status.clone().run(stop.clone())));
        }
        Chores { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The listening socket: the one systemd passed, or one bound here.
struct Socket {
    /// Until the server takes it.
    listener: Option<tokio::net::UnixListener>,
    /// The file to remove at shutdown: only one tokend bound itself.
    owned: Option<PathBuf>,
    /// Where it is, for the log.
    shown: String,
}

/// A start that fails after the socket was bound (`?` in [`serve`]) must
/// not leave its file behind for the next start to trip over.
impl Drop for Socket {
    fn drop(&mut self) {
        self.remove();
    }
}

impl Socket {
    /// Removes the socket file, when tokend made it and has not yet
    /// removed it.
    fn remove(&mut self) {
        if let Some(path) = self.owned.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(socket = %path.display(), "failed to remove the socket: {e}");
            }
        }
    }

    fn open(daemon: &DaemonConfig) -> anyhow::Result<Socket> {
        if let Some(passed) = systemd::listener()? {
            let shown = systemd::listener_path(&passed);
            tracing::info!(socket = %shown, "using the socket systemd passed");
            let listener = tokio::net::UnixListener::from_std(passed)
                .context("failed to register the socket systemd passed")?;
            return Ok(Socket {
                listener: Some(listener),
                owned: None,
                shown,
            });
        }
        Ok(Socket {
            listener: Some(server::bind(
                &daemon.socket,
                daemon.socket_mode,
                daemon.socket_group.as_deref(),
            )?),
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
    /// Where the caches' owner tasks run.
    owners: TaskTracker,
    shutdown: Shutdown,
    notifier: Arc<Notifier>,
    status: Arc<Status>,
    logging: Logging,
    /// Handed to every new service, so it can pass reload requests on.
    reload_requests: mpsc::Sender<ReloadAsked>,
    /// Handed to every new service: the audit log outlives reloads.
    audit: Arc<Audit>,
    /// Handed to every new service: the metrics endpoint's health, when
    /// `metrics_listen` is set.
    endpoint: Option<watch::Receiver<Health>>,
}

impl Reloader {
    /// The first service, for `config`.
    fn start(
        path: &Path,
        config: Config,
        shutdown: &Shutdown,
        notifier: Arc<Notifier>,
        logging: Logging,
        reload_requests: mpsc::Sender<ReloadAsked>,
        endpoint: Option<watch::Receiver<Health>>,
    ) -> anyhow::Result<Reloader> {
        let issuer =
            IssuerClient::for_config(&config).context("failed to set up the HTTP clients")?;
        let owners = TaskTracker::new();
        let audit = Arc::new(Audit::new());
        audit.set_handouts_logged(config.daemon.audit);
        let running = config.daemon.clone();
        let config = Arc::new(config);
        let cache = TokenCache::new(&config, issuer.clone(), owners.clone(), shutdown.deadline());
        let service = Service::new(config, cache, shutdown.deadline(), audit.clone())
            .with_reloads(reload_requests.clone())
            .with_endpoint(endpoint.clone());
        let (current, services) = watch::channel(Arc::new(service));
        let status = Arc::new(Status::new(notifier.clone(), services, endpoint.clone()));
        Ok(Reloader {
            path: path.to_owned(),
            current,
            running,
            owners,
            shutdown: shutdown.clone(),
            notifier,
            status,
            logging,
            reload_requests,
            audit,
            endpoint,
        })
    }

    /// How many keys the service in force has.
    fn keys(&self) -> usize {
        self.current.borrow().key_count()
    }

    /// Re-reads the configuration and its secret files; swaps in a new
    /// service when they are valid, keeps the running one when not. Either
    /// way systemd hears `READY=1` at the end. Returns the number of keys
    /// now configured, or why the reload was refused.
    async fn reload(&mut self, why: &str) -> Result<usize, String> {
        tracing::info!(config = %self.path.display(), "{why}: reloading");
        self.notifier.notify(&systemd::reloading()).await;
        let path = self.path.clone();
        let running = self.current.borrow().config().clone();
        // The HTTP clients read the system trust store: off the runtime too.
        let loading = tokio::task::spawn_blocking(move || {
            let config = config::reload(&path, &running).map_err(|e| e.to_string())?;
            let issuer = IssuerClient::for_config(&config)
                .map_err(|e| format!("failed to set up the HTTP clients: {e}"))?;
            Ok::<_, String>((config, issuer))
        });
        let outcome = match tokio::time::timeout(RELOAD_READ_LIMIT, loading).await {
            Ok(Ok(Ok((config, issuer)))) => Ok(self.swap(config, issuer)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "{} and its secret files could not be read within {} (a hung mount?)",
                self.path.display(),
                humantime::format_duration(RELOAD_READ_LIMIT)
            )),
        };
        if let Err(e) = &outcome {
            // Counted before it is logged (as in `swap`): whoever reads the
            // line finds the counter already moved.
            metrics::reloaded(false);
            tracing::error!("reload failed; still serving the previous configuration: {e}");
        }
        self.status.reload_failed(outcome.as_ref().err().cloned());
        self.notifier.notify(&self.status.ready()).await;
        outcome
    }

    /// Swaps in a service for `config`, whose keys `issuer` was built
    /// for; returns its number of keys.
    fn swap(&mut self, config: Config, issuer: IssuerClient) -> usize {
        self.warn_restart_needed(&config.daemon);
        self.logging.set_level(config.daemon.log_level);
        self.audit.set_handouts_logged(config.daemon.audit);
        let config = Arc::new(config);
        let cache = TokenCache::new(
            &config,
            issuer,
            self.owners.clone(),
            self.shutdown.deadline(),
        );
        let old = self.current.borrow().clone();
        let carried = cache.adopt(old.cache());
        old.cache().stop();
        let service = Arc::new(
            Service::new(
                config.clone(),
                cache,
                self.shutdown.deadline(),
                self.audit.clone(),
            )
            .with_reloads(self.reload_requests.clone())
            .with_endpoint(self.endpoint.clone()),
        );
        // From here on every request, on new connections and open ones
        // alike, is answered by the new service; requests already in
        // progress finish on the old one.
        self.current.send_replace(service.clone());
        service.cache().prefetch();
        metrics::reloaded(true);
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
            (
                "max_unread_bytes",
                old.max_unread_bytes != new.max_unread_bytes,
            ),
            (
                "max_unread_bytes_per_uid",
                old.max_unread_bytes_per_uid != new.max_unread_bytes_per_uid,
            ),
            ("metrics_listen", old.metrics_listen != new.metrics_listen),
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

/// The STATUS= line systemd shows: the current cache in numbers, the
/// metrics endpoint while it cannot listen, and the last reload's error
/// until a reload succeeds.
struct Status {
    notifier: Arc<Notifier>,
    services: watch::Receiver<Arc<Service>>,
    endpoint: Option<watch::Receiver<Health>>,
    reload_error: Mutex<Option<String>>,
    /// The last line sent, so an unchanged one is not sent again.
    sent: Mutex<String>,
}

impl Status {
    fn new(
        notifier: Arc<Notifier>,
        services: watch::Receiver<Arc<Service>>,
        endpoint: Option<watch::Receiver<Health>>,
    ) -> Status {
        Status {
            notifier,
            services,
            endpoint,
            reload_error: Mutex::default(),
            sent: Mutex::default(),
        }
    }

    fn line(&self) -> String {
        let service = self.services.borrow().clone();
        self.line_of(&service.cache().summary())
    }

    fn line_of(&self, summary: &CacheSummary) -> String {
        let mut line = systemd::status_line(summary);
        let endpoint = self
            .endpoint
            .as_ref()
            .and_then(|e| e.borrow().status_note());
        if let Some(note) = endpoint {
            line.push_str("; ");
            line.push_str(&note);
        }
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

    /// Sends the line when it changed: after an owner published an
    /// outcome or ended, after a reload, when a fresh token drops under
    /// `min_valid`, or when the metrics endpoint's health changed; at most
    /// once per [`STATUS_GAP`]. Nothing wakes an idle daemon for it.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut services = self.services.clone();
        let mut endpoint = self.endpoint.clone();
        loop {
            if let Some(endpoint) = endpoint.as_mut() {
                endpoint.mark_unchanged();
            }
            let service = services.borrow_and_update().clone();
            let summary = service.cache().summary();
            self.send_if_changed(self.line_of(&summary)).await;
            let stale = async {
                match summary.stale_in {
                    Some(after) => tokio::time::sleep(after).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = service.cache().changed() => {}
                () = stale => {}
                changed = services.changed() => if changed.is_err() { return },
                () = health_changed(&mut endpoint) => {}
                () = stop.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(STATUS_GAP) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn send_if_changed(&self, line: String) {
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

/// Returns when the endpoint's health changes; never when there is no
/// endpoint, or once it has stopped.
async fn health_changed(endpoint: &mut Option<watch::Receiver<Health>>) {
    let stopped = match endpoint.as_mut() {
        Some(health) => health.changed().await.is_err(),
        None => true,
    };
    if stopped {
        *endpoint = None;
        std::future::pending::<()>().await;
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
