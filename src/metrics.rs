//! The daemon's metrics: what is counted, under which labels, who may read
//! them over the socket, and how they become the Prometheus text format.
//!
//! This module owns the one registry of the process (counters, gauges and
//! the issuer-latency histogram, built with `prometheus-client`), the hooks
//! the rest of the daemon calls when something worth counting happens (one
//! call each: [`GetCounters::answered`], [`issuer_answered`], [`connection_opened`],
//! [`busy_refused`], [`reloaded`]), and [`render`], which writes the
//! registry and the figures read from the cache at scrape time. The HTTP
//! endpoint that serves them is [`http`]; the socket op is answered by
//! [`crate::service`], which asks [`may_read`] first.
//!
//! The registry is process-wide rather than handed around: what is scraped
//! is the process, its counters must outlive every reload's new service and
//! cache, and a static keeps each hook into the server, the service and the
//! issuer client a single line instead of a parameter threaded through
//! their constructors.
//!
//! Label values never carry a token, a secret or text a caller chose, so
//! callers cannot grow the number of series: keys are configured names
//! (a name nobody configured is counted as [`UNKNOWN_KEY`]), result codes
//! and outcomes are fixed words, and scope sets are the canonical sets the
//! cache holds, which each key's `scopes` list and `max_scope_sets` bound.

pub(crate) mod http;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::cache::TokenCache;
use crate::config::Config;
use crate::issuer::{FailureKind, Grant, IssuerError};
use crate::protocol::ErrorCode;

/// The `key` label of a get for a key that is not configured. The name
/// the caller sent is its own choice and never becomes a label value; the
/// `code="unknown_key"` beside it tells these apart from a key that an
/// operator happened to name `unknown`.
pub(crate) const UNKNOWN_KEY: &str = "unknown";

/// Issuer latency buckets, in seconds: a local issuer answers in
/// milliseconds, a remote one in tens to hundreds, and `request_timeout`
/// defaults to 10 s, so the top buckets catch timeouts.
const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Why the metrics could not be written out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MetricsError {
    #[error("failed to encode the metrics in the Prometheus text format")]
    Encode(#[from] std::fmt::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GetLabels {
    key: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    key: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

/// Encoded by hand so that a set without a resource has no `resource`
/// label at all (not an empty one): keys without `resource` keep the
/// series they always had. Resource values come from the configuration,
/// so the label is bounded like `scopes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SetLabels {
    key: String,
    scopes: String,
    resource: Option<String>,
}

impl EncodeLabelSet for SetLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut labels = vec![("key", self.key.as_str()), ("scopes", self.scopes.as_str())];
        if let Some(resource) = &self.resource {
            labels.push(("resource", resource));
        }
        labels.encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type LatencyFamily = Family<KeyLabels, Histogram, fn() -> Histogram>;

/// Every metric that is counted as things happen. What is read from the
/// cache at scrape time lives in [`snapshot`] instead.
struct Metrics {
    registry: Registry,
    gets: Family<GetLabels, Counter>,
    issuer_requests: Family<IssuerLabels, Counter>,
    issuer_latency: LatencyFamily,
    refresh_failures: Family<KeyLabels, Counter>,
    connections_open: Gauge,
    busy: Family<LimitLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    last_reload_ok: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("tokend"),
            gets: Family::default(),
            issuer_requests: Family::default(),
            issuer_latency: Family::new_with_constructor(latency_histogram),
            refresh_failures: Family::default(),
            connections_open: Gauge::default(),
            busy: Family::default(),
            reloads: Family::default(),
            last_reload_ok: Gauge::default(),
        };
        // Until a reload fails, the configuration in force is the one the
        // daemon validated at start.
        metrics.last_reload_ok.set(1);
        metrics.registered()
    }

    fn registered(mut self) -> Metrics {
        let registry = &mut self.registry;
        registry.register(
            "gets",
            "Gets answered, by key and result: ok or the protocol's error code",
            self.gets.clone(),
        );
        registry.register(
            "issuer_requests",
            "Token requests sent to the issuer, by key and outcome",
            self.issuer_requests.clone(),
        );
        registry.register(
            "issuer_request_duration_seconds",
            "How long token requests to the issuer took, by key",
            self.issuer_latency.clone(),
        );
        registry.register(
            "refresh_failures",
            "Attempts to fetch or refresh a token that failed, by key, including keys whose \
             secret could not be read",
            self.refresh_failures.clone(),
        );
        registry.register(
            "connections_open",
            "Socket connections open now",
            self.connections_open.clone(),
        );
        registry.register(
            "connections_refused_busy",
            "Socket connections answered busy and closed, by the limit they met",
            self.busy.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads, by outcome",
            self.reloads.clone(),
        );
        registry.register(
            "last_reload_ok",
            "1 when the last reload took (or none was asked for), 0 when it was refused",
            self.last_reload_ok.clone(),
        );
        registry.register(
            "build",
            "The running tokend's version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        self
    }
}

/// Counts answered gets. A get for a cached token is the daemon's hot
/// path, so each configured key's `code="ok"` counter is looked up in the
/// family once (its series appears with its first get, as before) and then
/// incremented with no label to build and no family lock to take.
pub(crate) struct GetCounters {
    ok: HashMap<String, OnceLock<Counter>>,
}

impl GetCounters {
    pub(crate) fn new(config: &Config) -> GetCounters {
        let ok = config.keys.keys().map(|key| (key.clone(), OnceLock::new()));
        GetCounters { ok: ok.collect() }
    }

    /// Counts one answered get. `key` is what the caller asked for; only
    /// a configured name becomes a label value. `code` is `None` for a
    /// token.
    pub(crate) fn answered(&self, key: &str, code: Option<ErrorCode>) {
        let slot = self.ok.get(key);
        if let (Some(slot), None) = (slot, code) {
            slot.get_or_init(|| METRICS.gets.get_or_create(&get_labels(key, "ok")).clone())
                .inc();
            return;
        }
        let key = if slot.is_some() { key } else { UNKNOWN_KEY };
        let code = code.map_or("ok", code_label);
        METRICS.gets.get_or_create(&get_labels(key, code)).inc();
    }
}

fn get_labels(key: &str, code: &'static str) -> GetLabels {
    GetLabels {
        key: key.to_owned(),
        code,
    }
}

/// Counts one token request for `key` and how long it took. A key whose
/// secret could not be read never reaches the issuer: that is a refresh
/// failure, not an issuer request.
pub(crate) fn issuer_answered(key: &str, result: &Result<Grant, IssuerError>, took: Duration) {
    let labels = KeyLabels {
        key: key.to_owned(),
    };
    let outcome = match result {
        Ok(_) => "ok",
        Err(error) => {
            METRICS.refresh_failures.get_or_create(&labels).inc();
            match failure_label(&error.kind) {
                Some(outcome) => outcome,
                None => return,
            }
        }
    };
    METRICS
        .issuer_latency
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    let labels = IssuerLabels {
        key: labels.key,
        outcome,
    };
    METRICS.issuer_requests.get_or_create(&labels).inc();
}

/// An open socket connection, counted until dropped.
#[must_use = "the connection is counted as open until this is dropped"]
pub(crate) struct OpenConnection(());

impl Drop for OpenConnection {
    fn drop(&mut self) {
        METRICS.connections_open.dec();
    }
}

/// Counts a connection as open until the value returned is dropped.
pub(crate) fn connection_opened() -> OpenConnection {
    METRICS.connections_open.inc();
    OpenConnection(())
}

/// The connection limit a caller met.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BusyLimit {
    MaxConnections,
    MaxConnectionsPerUid,
}

/// Counts a connection answered `busy` and closed.
pub(crate) fn busy_refused(limit: BusyLimit) {
    let limit = match limit {
        BusyLimit::MaxConnections => "max_connections",
        BusyLimit::MaxConnectionsPerUid => "max_connections_per_uid",
    };
    METRICS.busy.get_or_create(&LimitLabels { limit }).inc();
}

/// Counts a reload, SIGHUP or asked over the socket, by whether it took.
pub(crate) fn reloaded(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    METRICS
        .reloads
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    METRICS.last_reload_ok.set(i64::from(ok));
}

/// Whether the caller `uid` may read the metrics over the socket: only
/// when `metrics_allow_uids` names it, root and tokend's own user included
/// (issue 13's contract: the list decides, nobody is implied).
#[must_use]
pub(crate) fn may_read(uid: u32, allowed: &[u32]) -> bool {
    allowed.contains(&uid)
}

/// The metrics in the Prometheus text format (version 0.0.4): everything
/// counted so far, then what `cache` holds now for the keys of `config`.
pub(crate) fn render(config: &Config, cache: &TokenCache) -> Result<String, MetricsError> {
    let mut text = String::new();
    prometheus_text::encode(&mut text, &METRICS.registry)?;
    prometheus_text::encode(&mut text, &snapshot(config, cache))?;
    Ok(text)
}

/// The `Content-Type` of what [`render`] writes.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The figures read from the cache at scrape time: per cached scope set,
/// the seconds its token has left and whether its last request failed.
/// Built afresh for each scrape, so a set the cache dropped leaves no
/// series behind.
fn snapshot(config: &Config, cache: &TokenCache) -> Registry {
    let expires_in = Family::<SetLabels, Gauge<f64, AtomicU64>>::default();
    let failing = Family::<SetLabels, Gauge>::default();
    for name in config.keys.keys() {
        for set in cache.status(name) {
            let labels = SetLabels {
                key: name.clone(),
                scopes: set.scopes.to_string(),
                resource: set.resource.as_deref().map(str::to_owned),
            };
            if let Some(left) = set.remaining {
                expires_in.get_or_create(&labels).set(left.as_secs_f64());
            }
            failing
                .get_or_create(&labels)
                .set(i64::from(set.last_error.is_some()));
        }
    }
    let mut registry = Registry::with_prefix("tokend");
    registry.register(
        "token_expires_in_seconds",
        "Seconds until the cached token of a key and scope set expires (0 once it has)",
        expires_in,
    );
    registry.register(
        "token_refresh_failing",
        "1 when the last token request of a key and scope set failed, else 0",
        failing,
    );
    registry
}

/// The protocol's error codes, as label values: the words callers see.
fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::UnknownOp => "unknown_op",
        ErrorCode::UnknownKey => "unknown_key",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::ScopeNotAllowed => "scope_not_allowed",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Busy => "busy",
        ErrorCode::ReloadFailed => "reload_failed",
    }
}

/// An issuer failure as an `outcome` label; `None` when the issuer was
/// never asked.
fn failure_label(kind: &FailureKind) -> Option<&'static str> {
    Some(match kind {
        FailureKind::Denied { .. } => "denied",
        FailureKind::Refused { .. } => "refused",
        FailureKind::Http { .. } => "http_error",
        FailureKind::Malformed { .. } => "malformed",
        FailureKind::TooWide { .. } => "too_wide",
        FailureKind::TooLarge => "too_large",
        FailureKind::Timeout(_) => "timeout",
        FailureKind::Transport(_) => "unreachable",
        FailureKind::Tls(_) => "tls",
        // The issuer was asked, for its discovery document.
        FailureKind::Discovery(_) => "discovery",
        FailureKind::NoSecret(_) | FailureKind::Assertion(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_label_is_there_only_for_a_set_with_a_resource() {
        let family = Family::<SetLabels, Gauge>::default();
        let labels = |resource: Option<&str>| SetLabels {
            key: "k".into(),
            scopes: "[a]".into(),
            resource: resource.map(str::to_owned),
        };
        family.get_or_create(&labels(None)).set(1);
        family
            .get_or_create(&labels(Some("https://api.example/")))
            .set(2);
        let mut registry = Registry::default();
        registry.register("g", "test", family);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("g{key=\"k\",scopes=\"[a]\"} 1\n"), "{text}");
        assert!(
            text.contains("g{key=\"k\",scopes=\"[a]\",resource=\"https://api.example/\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn code_labels_are_the_words_on_the_wire() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::UnknownOp,
            ErrorCode::UnknownKey,
            ErrorCode::Forbidden,
            ErrorCode::ScopeNotAllowed,
            ErrorCode::Unavailable,
            ErrorCode::TooLarge,
            ErrorCode::Busy,
            ErrorCode::ReloadFailed,
        ] {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire.as_str(), Some(code_label(code)));
        }
    }

    #[test]
    fn only_listed_uids_may_read() {
        assert!(!may_read(0, &[]));
        assert!(may_read(0, &[0]));
        assert!(may_read(1000, &[1000]));
        assert!(!may_read(1001, &[1000]));
    }

    #[test]
    fn the_registry_encodes_as_prometheus_text() {
        let metrics = Metrics::new();
        metrics
            .gets
            .get_or_create(&GetLabels {
                key: "payments".into(),
                code: "ok",
            })
            .inc();
        metrics
            .issuer_latency
            .get_or_create(&KeyLabels {
                key: "payments".into(),
            })
            .observe(0.02);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &metrics.registry).unwrap();
        for line in [
            "# TYPE tokend_gets_total counter",
            "tokend_gets_total{key=\"payments\",code=\"ok\"} 1",
            "tokend_issuer_request_duration_seconds_bucket{key=\"payments\",le=\"0.025\"} 1",
            "tokend_issuer_request_duration_seconds_count{key=\"payments\"} 1",
            "tokend_connections_open 0",
            "tokend_last_reload_ok 1",
            concat!(
                "tokend_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "OpenMetrics, not Prometheus text");
    }
}
