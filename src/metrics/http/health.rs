//! Whether the metrics endpoint is serving, as [`super::Endpoint`]
//! publishes it and the `status` answer and systemd's status line show it;
//! and the backoff between attempts to bind. Apart from the endpoint, so
//! that the service reading it does not import the HTTP server, which
//! answers through the service.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::protocol::{EndpointState, EndpointStatus};

/// The wait after the first failed bind; each failure doubles it.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to bind: how long the endpoint
/// stays away, at most, once its address is free again.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(30);

/// Whether the endpoint is serving.
#[derive(Debug, Clone)]
pub(crate) enum Health {
    /// Serving on this address (the port the kernel picked, for port 0).
    Listening(SocketAddr),
    /// The address could not be bound; another attempt is due.
    Retrying(Retrying),
}

/// Failed attempts to bind, and when the next one is due.
#[derive(Debug, Clone)]
pub(crate) struct Retrying {
    pub(super) wanted: SocketAddr,
    /// The last failure, in the system's words.
    pub(super) error: String,
    pub(super) kind: io::ErrorKind,
    pub(super) since: SystemTime,
    pub(super) attempts: u32,
    pub(super) next_attempt: Instant,
}

impl Retrying {
    /// After the first failure, `cause`.
    pub(super) fn new(wanted: SocketAddr, cause: &io::Error) -> Retrying {
        Retrying {
            wanted,
            error: cause.to_string(),
            kind: cause.kind(),
            since: SystemTime::now(),
            attempts: 1,
            next_attempt: Instant::now() + retry_delay(1),
        }
    }

    /// After another failure, `cause`.
    pub(super) fn failed_again(&mut self, cause: &io::Error) {
        self.attempts = self.attempts.saturating_add(1);
        self.error = cause.to_string();
        self.kind = cause.kind();
        self.next_attempt = Instant::now() + retry_delay(self.attempts);
    }
}

/// The wait after `attempts` failed attempts: [`FIRST_RETRY`] doubled for
/// each failure after the first, at most [`MAX_RETRY`].
fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (FIRST_RETRY * 2u32.pow(doublings)).min(MAX_RETRY)
}

impl Health {
    /// What the `status` answer says of the endpoint, now.
    pub(crate) fn report(&self) -> EndpointStatus {
        match self {
            Health::Listening(address) => EndpointStatus {
                address: address.to_string(),
                state: EndpointState::Listening,
                error: None,
                failing_since: None,
                attempts: None,
                next_attempt_in: None,
            },
            Health::Retrying(retrying) => {
                let left = retrying
                    .next_attempt
                    .saturating_duration_since(Instant::now());
                EndpointStatus {
                    address: retrying.wanted.to_string(),
                    state: EndpointState::Retrying,
                    error: Some(retrying.error.clone()),
                    failing_since: Some(
                        humantime::format_rfc3339_seconds(retrying.since).to_string(),
                    ),
                    attempts: Some(retrying.attempts),
                    // Rounded up: an attempt in 0.3 s is not due "now".
                    next_attempt_in: Some(left.as_secs() + u64::from(left.subsec_nanos() > 0)),
                }
            }
        }
    }

    /// What systemd's status line adds while the endpoint is not serving.
    /// Attempts and times are left out, so the line changes only when the
    /// trouble does.
    pub(crate) fn status_note(&self) -> Option<String> {
        match self {
            Health::Listening(_) => None,
            Health::Retrying(retrying) => Some(format!(
                "metrics endpoint {} not listening ({}), retrying",
                retrying.wanted, retrying.error
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_one_second_up_to_thirty() {
        let waits: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
    }
}
