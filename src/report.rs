//! What `tokend status` and `tokend keys` print: one row per key and scope
//! set in aligned columns, or the same rows as JSON for scripts.
//!
//! Pure: it takes the daemon's answer and the time and returns text, so
//! the layout is tested without a daemon. Colour (the state column only)
//! is the caller's choice: on a terminal, never with `NO_COLOR`, never
//! when piped. Styles come from `anstyle`, which clap already brings.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anstyle::{AnsiColor, Style};
use serde::Serialize;

use crate::printable;
use crate::protocol::{EndpointState, EndpointStatus, KeyInfo, KeyStatus, SetHealth, SetStatus};

/// One row of `tokend status`, as `--json` prints it. Times are RFC 3339
/// UTC, durations whole seconds; absent fields are `null`.
#[derive(Debug, Serialize)]
pub struct StatusRow<'a> {
    pub key: &'a str,
    pub scopes: &'a [String],
    /// The RFC 8707 resource of the set; left out (not `null`) when none,
    /// so rows of keys without `resource` read as they always did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<&'a str>,
    pub state: SetHealth,
    /// A `prefetch` set, which the exit status vouches for.
    pub prefetch: bool,
    /// Whether this row keeps the exit status at 0.
    pub healthy: bool,
    pub expires_in: Option<u64>,
    pub expires_at: Option<&'a str>,
    pub next_refresh_in: Option<u64>,
    pub next_refresh_at: Option<&'a str>,
    pub last_success: Option<&'a str>,
    pub last_error: Option<LastError<'a>>,
    pub issuer_requests: u64,
    pub gets: u64,
}

/// The last failed issuer request: the issuer's HTTP status and words.
#[derive(Debug, Serialize)]
pub struct LastError<'a> {
    pub message: &'a str,
    pub status: Option<u16>,
    pub at: Option<&'a str>,
}

/// Every set of every key, in the daemon's order (keys by name, sets by
/// scope set).
pub fn status_rows(keys: &[KeyStatus]) -> Vec<StatusRow<'_>> {
    keys.iter()
        .flat_map(|key| key.sets.iter().map(move |set| row(&key.name, set)))
        .collect()
}

fn row<'a>(key: &'a str, set: &'a SetStatus) -> StatusRow<'a> {
    StatusRow {
        key,
        scopes: &set.scopes,
        resource: set.resource.as_deref(),
        state: set.health,
        prefetch: set.prefetch,
        healthy: set.healthy(),
        expires_in: set.expires_in,
        expires_at: set.expires_at.as_deref(),
        next_refresh_in: set.next_refresh_in,
        next_refresh_at: set.next_refresh_at.as_deref(),
        last_success: set.last_refresh.as_deref(),
        last_error: set.last_error.as_deref().map(|message| LastError {
            message,
            status: set.last_error_status,
            at: set.last_error_at.as_deref(),
        }),
        issuer_requests: set.issuer_requests,
        gets: set.gets,
    }
}

/// `--json`: the rows, the verdict the exit status gives, and the metrics
/// endpoint as the daemon reported it (left out when it has none).
pub fn status_json(rows: &[StatusRow<'_>], endpoint: Option<&EndpointStatus>) -> String {
    #[derive(Serialize)]
    struct Report<'r, 'a> {
        healthy: bool,
        sets: &'r [StatusRow<'a>],
        #[serde(skip_serializing_if = "Option::is_none")]
        metrics_endpoint: Option<&'r EndpointStatus>,
    }
    let report = Report {
        healthy: rows.iter().all(|row| row.healthy),
        sets: rows,
        metrics_endpoint: endpoint,
    };
    // Strings, numbers and enums only: serde_json cannot fail on them.
    serde_json::to_string_pretty(&report).unwrap_or_default()
}

/// The table `tokend status` prints at `now`; `colour` styles the state.
pub fn status_table(rows: &[StatusRow<'_>], now: SystemTime, colour: bool) -> String {
    let header = [
        "KEY",
        "SCOPES",
        "PREFETCH",
        "STATE",
        "LEFT",
        "NEXT REFRESH",
        "LAST SUCCESS",
        "REQUESTS",
        "GETS",
        "LAST ERROR",
    ];
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|row| {
            [
                row.key.to_owned(),
                scopes_for(row.scopes, row.resource),
                if row.prefetch { "yes" } else { "no" }.to_owned(),
                state_word(row.state).to_owned(),
                row.expires_in.map_or("-".into(), span),
                next_refresh(row),
                row.last_success.map_or("never".into(), |at| ago(at, now)),
                row.issuer_requests.to_string(),
                row.gets.to_string(),
                row.last_error.as_ref().map_or("-".into(), |e| {
                    e.at.map_or(e.message.to_owned(), |at| {
                        format!("{} ({})", e.message, ago(at, now))
                    })
                }),
            ]
        })
        .collect();
    let styles: Vec<Style> = rows.iter().map(|row| style(row.state)).collect();
    table(&header, &cells, |row, column| {
        (colour && column == 3).then(|| styles[row])
    })
}

/// The line `tokend status` prints under its table for the metrics
/// endpoint, at `now`. Its words come from whatever daemon answered, so
/// they are shown by the one printable rule before they reach a terminal.
pub fn endpoint_line(endpoint: &EndpointStatus, now: SystemTime) -> String {
    let address = printable::one_line(&endpoint.address);
    match endpoint.state {
        EndpointState::Listening => format!("metrics endpoint: listening on {address}\n"),
        EndpointState::Retrying => {
            let mut line = format!("metrics endpoint: not listening on {address}");
            if let Some(error) = &endpoint.error {
                let _ = write!(line, ": {}", printable::one_line(error));
            }
            if let Some(attempts) = endpoint.attempts {
                let plural = if attempts == 1 { "" } else { "s" };
                let _ = write!(line, "; {attempts} failed attempt{plural}");
            }
            if let Some(since) = &endpoint.failing_since {
                let _ = write!(
                    line,
                    ", the first {}",
                    printable::one_line(&ago(since, now))
                );
            }
            if let Some(next) = endpoint.next_attempt_in {
                let _ = write!(line, "; next in {}", span(next));
            }
            line.push('\n');
            line
        }
    }
}

/// The table `tokend keys` prints.
pub fn keys_table(keys: &[KeyInfo]) -> String {
    let cells: Vec<[String; 2]> = keys
        .iter()
        .map(|key| {
            let scopes = if key.scopes.is_empty() {
                "(any the issuer grants)".to_owned()
            } else {
                key.scopes.join(" ")
            };
            [key.name.clone(), scopes]
        })
        .collect();
    table(&["KEY", "ALLOWED SCOPES"], &cells, |_, _| None)
}

/// Left-aligned columns two spaces apart, the last one unpadded.
/// `style(row, column)` colours a cell without counting its escapes.
///
/// Every cell is the daemon's text, and the daemon at `--socket` may be
/// any program: each is shown as one line without control characters, so
/// that no cell can command the terminal or start a row of its own.
fn table<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    style: impl Fn(usize, usize) -> Option<Style>,
) -> String {
    let rows: Vec<[Cow<'_, str>; N]> = rows
        .iter()
        .map(|row| std::array::from_fn(|column| printable::one_line(&row[column])))
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(Cow::Borrowed);
    for (index, row) in std::iter::once(&header).chain(&rows).enumerate() {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            let pad = if column + 1 == N {
                0
            } else {
                widths[column] + 2 - cell.chars().count()
            };
            let styled = index
                .checked_sub(1)
                .and_then(|row| style(row, column))
                .filter(|s| *s != Style::new());
            match styled {
                Some(s) => {
                    let _ = write!(line, "{s}{cell}{s:#}");
                }
                None => line.push_str(cell),
            }
            line.push_str(&" ".repeat(pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn state_word(state: SetHealth) -> &'static str {
    match state {
        SetHealth::Paused => "paused",
        SetHealth::Failing => "failing",
        SetHealth::Refreshing => "refreshing",
        SetHealth::Fresh => "fresh",
        SetHealth::Expired => "expired",
        SetHealth::NeverFetched => "never fetched",
    }
}

fn style(state: SetHealth) -> Style {
    let colour = match state {
        SetHealth::Fresh => AnsiColor::Green,
        SetHealth::Refreshing => AnsiColor::Cyan,
        SetHealth::Expired | SetHealth::NeverFetched => AnsiColor::Yellow,
        SetHealth::Failing | SetHealth::Paused => AnsiColor::Red,
    };
    Style::new().fg_color(Some(colour.into())).bold()
}

/// An empty set asks for the key's default; say so rather than print
/// nothing.
fn scopes(scopes: &[String]) -> String {
    if scopes.is_empty() {
        "(default)".to_owned()
    } else {
        scopes.join(" ")
    }
}

/// The SCOPES cell: the scopes, then ` @ RESOURCE` for a set asked for
/// a resource, which the same scopes without it are a different set from.
fn scopes_for(set: &[String], resource: Option<&str>) -> String {
    match resource {
        Some(resource) => format!("{} @ {resource}", scopes(set)),
        None => scopes(set),
    }
}

fn next_refresh(row: &StatusRow<'_>) -> String {
    match row.next_refresh_in {
        Some(0) => "now".to_owned(),
        Some(secs) => format!("in {}", span(secs)),
        None => "on next get".to_owned(),
    }
}

/// How long ago an RFC 3339 time was, at `now`.
fn ago(at: &str, now: SystemTime) -> String {
    match humantime::parse_rfc3339(at) {
        Ok(then) => {
            let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
            format!("{} ago", span(secs))
        }
        Err(_) => at.to_owned(),
    }
}

/// A span in its two largest units: `45s`, `3m 20s`, `2h 5m`, `3d 4h`.
fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let Some(first) = units.iter().position(|(size, _)| secs >= *size) else {
        return "0s".to_owned();
    };
    let (size, name) = units[first];
    let mut out = format!("{}{name}", secs / size);
    if let Some((next, next_name)) = units.get(first + 1) {
        let rest = secs % size / next;
        if rest > 0 {
            let _ = write!(out, " {rest}{next_name}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SetState;

    fn set(scopes: &[&str], health: SetHealth, prefetch: bool) -> SetStatus {
        SetStatus {
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            resource: None,
            state: SetState::Fresh,
            fetching: false,
            expires_at: Some("2026-11-26T11:00:00Z".into()),
            expires_in: Some(3_542),
            last_refresh: Some("2026-11-26T10:00:00Z".into()),
            last_error: None,
            health,
            prefetch,
            next_refresh_in: Some(2_100),
            next_refresh_at: Some("2026-11-26T10:36:00Z".into()),
            last_error_status: None,
            last_error_at: None,
            issuer_requests: 1,
            gets: 12,
        }
    }

    #[test]
    fn spans_keep_two_units() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(45), "45s");
        assert_eq!(span(200), "3m 20s");
        assert_eq!(span(3_600), "1h");
        assert_eq!(span(7_530), "2h 5m");
        assert_eq!(span(273_600), "3d 4h");
    }

    #[test]
    fn the_table_aligns_columns_and_colours_only_when_asked() {
        let mut failing = set(&[], SetHealth::Failing, true);
        failing.last_error = Some("access denied (HTTP 401: invalid_client)".into());
        failing.last_error_at = Some("2026-11-26T10:00:57Z".into());
        failing.next_refresh_in = None;
        let keys = [
            KeyStatus {
                name: "payments".into(),
                sets: vec![set(&["vault"], SetHealth::Fresh, true), failing],
            },
            KeyStatus {
                name: "fx".into(),
                sets: vec![set(&["a", "b"], SetHealth::NeverFetched, false)],
            },
        ];
        let rows = status_rows(&keys);
        let now = humantime::parse_rfc3339("2026-11-26T10:01:00Z").unwrap();
        let plain = status_table(&rows, now, false);
        let lines: Vec<&str> = plain.lines().collect();
        assert_eq!(lines.len(), 4, "{plain}");
        assert!(!plain.contains('\x1b'), "{plain}");
        let at = lines[0].find("STATE").unwrap();
        for (line, word) in lines[1..].iter().zip(["fresh", "failing", "never fetched"]) {
            assert_eq!(line.find(word), Some(at), "{plain}");
        }
        assert!(lines[1].contains("in 35m") && lines[1].contains("1m ago"));
        assert!(lines[2].contains("(default)") && lines[2].contains("on next get"));
        assert!(lines[2].ends_with("access denied (HTTP 401: invalid_client) (3s ago)"));
        let coloured = status_table(&rows, now, true);
        assert!(coloured.contains("\x1b["), "{coloured}");
        assert_eq!(strip_escapes(&coloured), plain);
    }

    #[test]
    fn json_names_each_set_and_the_verdict() {
        let keys = [KeyStatus {
            name: "payments".into(),
            sets: vec![
                set(&["vault"], SetHealth::Fresh, true),
                set(&["fx"], SetHealth::Expired, false),
            ],
        }];
        let rows = status_rows(&keys);
        let json: serde_json::Value = serde_json::from_str(&status_json(&rows, None)).unwrap();
        assert_eq!(json["healthy"], true);
        assert_eq!(json["sets"][0]["key"], "payments");
        assert_eq!(json["sets"][0]["state"], "fresh");
        assert_eq!(json["sets"][1]["state"], "expired");
        assert_eq!(json["sets"][1]["last_error"], serde_json::Value::Null);
    }

    #[test]
    fn the_metrics_endpoint_line_says_why_it_does_not_listen() {
        let now = humantime::parse_rfc3339("2026-11-26T10:01:00Z").unwrap();
        let mut endpoint = EndpointStatus {
            address: "127.0.0.1:9464".into(),
            state: EndpointState::Retrying,
            error: Some("Address already in use (os error 98)".into()),
            failing_since: Some("2026-11-26T09:58:40Z".into()),
            attempts: Some(5),
            next_attempt_in: Some(16),
        };
        assert_eq!(
            endpoint_line(&endpoint, now),
            "metrics endpoint: not listening on 127.0.0.1:9464: Address already in use \
             (os error 98); 5 failed attempts, the first 2m 20s ago; next in 16s\n"
        );
        endpoint.error = Some("in use\x1b]0;pwned\x07\nkey: ok".into());
        let line = endpoint_line(&endpoint, now);
        assert!(
            !line.trim_end().contains(['\x1b', '\x07', '\n']),
            "{line:?}"
        );
        let listening = EndpointStatus {
            address: "[::1]:9464".into(),
            state: EndpointState::Listening,
            error: None,
            failing_since: None,
            attempts: None,
            next_attempt_in: None,
        };
        assert_eq!(
            endpoint_line(&listening, now),
            "metrics endpoint: listening on [::1]:9464\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&status_json(&[], Some(&listening))).unwrap();
        assert_eq!(json["metrics_endpoint"]["state"], "listening");
        assert!(json["metrics_endpoint"].get("error").is_none(), "{json}");
    }

    fn strip_escapes(text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn a_set_with_a_resource_names_it_in_the_table_and_the_json() {
        let mut api = set(&["vault"], SetHealth::Fresh, false);
        api.resource = Some("https://api.example/".into());
        let keys = [KeyStatus {
            name: "payments".into(),
            sets: vec![set(&["vault"], SetHealth::Fresh, false), api],
        }];
        let rows = status_rows(&keys);
        let now = humantime::parse_rfc3339("2026-11-26T10:01:00Z").unwrap();
        let table = status_table(&rows, now, false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(!lines[1].contains('@'), "{table}");
        assert!(lines[2].contains("vault @ https://api.example/"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&status_json(&rows, None)).unwrap();
        assert!(json["sets"][0].get("resource").is_none(), "{json}");
        assert_eq!(json["sets"][1]["resource"], "https://api.example/");
    }
}
