//! The daemon's log: native journald entries with fields when stderr is
//! the journal, human-readable lines on stderr otherwise, and the filter
//! that decides what reaches either (`RUST_LOG`, else `[daemon] log_level`,
//! which a reload may change). What is logged is the other modules'
//! business; how often a caller can make it log, [`crate::audit`]'s.

use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

use crate::systemd;

/// The daemon's log: native journald entries with fields (KEY, SCOPES,
/// PEER_UID, …) when stderr is the journal, human-readable lines on stderr
/// otherwise. `RUST_LOG` sets the filter when present; else `[daemon]
/// log_level` does, and a reload can change it. Either way a bare level
/// applies to tokend's own events only: the HTTP stack stays at `warn`
/// unless `RUST_LOG` names it, because at `trace` it logs request headers,
/// and with them the client's Basic credentials.
pub(crate) struct Logging {
    /// `None` when `RUST_LOG` decides: then a reload leaves the level be.
    level: Option<reload::Handle<EnvFilter, Registry>>,
}

impl Logging {
    pub(crate) fn init(level: LevelFilter) -> Logging {
        let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
            .ok()
            .and_then(|text| EnvFilter::try_new(own_directives(&text)).ok());
        let fixed = from_env.is_some();
        let filter = from_env.unwrap_or_else(|| EnvFilter::new(own_directives(&level.to_string())));
        let (filter, handle) = reload::Layer::new(filter);
        let registry = tracing_subscriber::registry().with(filter);
        let journald = systemd::stderr_is_journal().then(tracing_journald::layer);
        let fallback_reason = match journald {
            Some(Ok(layer)) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("tokend".to_owned());
                let _ = registry.with(layer).try_init();
                None
            }
            other => {
                let stderr = tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
                let _ = registry.with(stderr).try_init();
                other.and_then(Result::err)
            }
        };
        if let Some(e) = fallback_reason {
            tracing::warn!("stderr is the journal but journald cannot be reached ({e}); logging text to stderr");
        }
        Logging {
            level: (!fixed).then_some(handle),
        }
    }

    pub(crate) fn set_level(&self, level: LevelFilter) {
        if let Some(handle) = &self.level {
            if let Err(e) = handle.reload(EnvFilter::new(own_directives(&level.to_string()))) {
                tracing::warn!("failed to change the log level: {e}");
            }
        }
    }
}

/// Rewrites a filter so that its bare levels (`trace`) apply to tokend's
/// own events (`tokend=trace`), under a `warn` floor for everything else;
/// directives that name a target are kept as they are. When a directive
/// names tokend itself, it alone decides tokend's level.
fn own_directives(filter: &str) -> String {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let names_tokend = directives.iter().any(|d| d.starts_with("tokend"));
    let mut out = vec!["warn".to_owned()];
    for directive in directives {
        if directive.parse::<LevelFilter>().is_ok() {
            if !names_tokend {
                out.push(format!("tokend={directive}"));
            }
        } else {
            out.push(directive.to_owned());
        }
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::own_directives;

    #[test]
    fn bare_levels_apply_to_tokend_only() {
        assert_eq!(own_directives("trace"), "warn,tokend=trace");
        assert_eq!(own_directives("info"), "warn,tokend=info");
        assert_eq!(own_directives("tokend=trace,info"), "warn,tokend=trace");
        assert_eq!(
            own_directives("debug,hyper=trace"),
            "warn,tokend=debug,hyper=trace"
        );
        assert_eq!(own_directives(""), "warn");
    }
}
