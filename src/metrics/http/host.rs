//! Whom a scrape is addressed to: the metrics endpoint's `Host:` rule.
//! Pure, so that tests feed it strings.
//!
//! A web page open in a browser on the host can reach a loopback port
//! through DNS rebinding: the page's own host name is made to resolve to
//! 127.0.0.1, and the browser, deeming the requests same-origin, lets the
//! page read the answers. Such a request carries the page's host name in
//! `Host:`. The endpoint answers only requests addressed to its own address
//! (the one the connection reached, so a wildcard `metrics_listen` works
//! too; IPv6 in brackets) or to `localhost`, with its port or none: names a
//! rebinding page cannot put there, since the browser writes the page's
//! host and a page served from either is on this host already.
//!
//! HTTP/1.1 requires exactly one `Host:` (RFC 9112, section 3.2): none or
//! two make the request malformed. An HTTP/1.0 request may lack it; no
//! browser sends one without it, so it cannot come from a rebinding page,
//! and it is answered (a hand-typed `GET /metrics HTTP/1.0` through
//! `socat` keeps working). When the request target carries an authority
//! (absolute form), that authority is the one judged: RFC 9112, section
//! 3.2.2, makes it the one that counts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hyper::header::HeaderValue;
use hyper::Version;

/// What the endpoint makes of a request's addressing.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Addressed {
    /// To this endpoint: answer it.
    Here,
    /// To another host name or address: 421.
    Elsewhere,
    /// No `Host:` on HTTP/1.1, or more than one: 400.
    Malformed,
}

/// Judges a request of `version` whose target had `target_authority` (in
/// absolute form) and `hosts` as its `Host:` fields, which reached the
/// endpoint at `local`.
pub(super) fn addressed<'a>(
    version: Version,
    target_authority: Option<&str>,
    mut hosts: impl Iterator<Item = &'a HeaderValue>,
    local: SocketAddr,
) -> Addressed {
    let host = hosts.next();
    if hosts.next().is_some() {
        return Addressed::Malformed;
    }
    let http_1_0 = version <= Version::HTTP_10;
    let authority = match (target_authority, host) {
        (_, None) if !http_1_0 => return Addressed::Malformed,
        (Some(authority), _) => authority,
        (None, Some(host)) => match host.to_str() {
            Ok(host) => host,
            Err(_) => return Addressed::Elsewhere,
        },
        (None, None) => return Addressed::Here,
    };
    if names(authority, local) {
        Addressed::Here
    } else {
        Addressed::Elsewhere
    }
}

/// Whether `authority` names the endpoint at `local`: `localhost` (in any
/// case) or `local`'s address, with `local`'s port or none.
fn names(authority: &str, local: SocketAddr) -> bool {
    let Some((host, port)) = split(authority) else {
        return false;
    };
    let port_fits = port.map_or(true, |port| {
        port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>() == Ok(local.port())
    });
    let host_fits = match host {
        Host::Name(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name.parse::<Ipv4Addr>().map(IpAddr::V4) == Ok(local.ip())
        }
        Host::V6(literal) => literal.parse::<Ipv6Addr>().map(IpAddr::V6) == Ok(local.ip()),
    };
    port_fits && host_fits
}

enum Host<'a> {
    /// A name or an IPv4 address.
    Name(&'a str),
    /// What was inside the brackets.
    V6(&'a str),
}

/// `host[:port]` or `[v6]` `[:port]` into its host and port; `None` when
/// it is neither.
fn split(authority: &str) -> Option<(Host<'_>, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':')?),
        };
        return Some((Host::V6(literal), port));
    }
    Some(match authority.split_once(':') {
        Some((name, port)) => (Host::Name(name), Some(port)),
        None => (Host::Name(authority), None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(version: Version, target: Option<&str>, hosts: &[&str], local: &str) -> Addressed {
        let hosts: Vec<HeaderValue> = hosts
            .iter()
            .map(|h| HeaderValue::from_str(h).unwrap())
            .collect();
        addressed(version, target, hosts.iter(), local.parse().unwrap())
    }

    fn host(value: &str, local: &str) -> Addressed {
        judge(Version::HTTP_11, None, &[value], local)
    }

    #[test]
    fn its_own_address_and_localhost_with_its_port_or_none() {
        let v4 = "127.0.0.1:9464";
        for value in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "localhost",
            "localhost:9464",
            "LOCALHOST:9464",
        ] {
            assert_eq!(host(value, v4), Addressed::Here, "{value}");
        }
        let v6 = "[::1]:9464";
        for value in ["[::1]:9464", "[::1]", "[0:0:0:0:0:0:0:1]:9464", "localhost"] {
            assert_eq!(host(value, v6), Addressed::Here, "{value}");
        }
    }

    #[test]
    fn any_other_name_address_or_port_is_elsewhere() {
        let v4 = "127.0.0.1:9464";
        for value in [
            "attacker.example",
            "attacker.example:9464",
            "localhost.attacker.example:9464",
            "localhost.",
            "127.0.0.2:9464",
            "127.1:9464",
            "127.000.0.1:9464",
            "127.0.0.1:9465",
            "127.0.0.1:+9464",
            "127.0.0.1:",
            "localhost:09464x",
            "user@127.0.0.1:9464",
            "[::1]:9464",
            "[127.0.0.1]:9464",
            "",
        ] {
            assert_eq!(host(value, v4), Addressed::Elsewhere, "{value:?}");
        }
        let v6 = "[::1]:9464";
        for value in ["::1", "127.0.0.1:9464", "[::1]9464", "[::1", "[::2]:9464"] {
            assert_eq!(host(value, v6), Addressed::Elsewhere, "{value:?}");
        }
    }

    #[test]
    fn a_wildcard_listener_answers_to_the_address_the_connection_reached() {
        // `local` is the connection's own address, never 0.0.0.0.
        assert_eq!(host("192.0.2.7:9464", "192.0.2.7:9464"), Addressed::Here);
        assert_eq!(host("0.0.0.0:9464", "192.0.2.7:9464"), Addressed::Elsewhere);
    }

    #[test]
    fn host_is_required_once_in_http_1_1_and_may_be_missing_in_1_0() {
        let local = "127.0.0.1:9464";
        assert_eq!(
            judge(Version::HTTP_11, None, &[], local),
            Addressed::Malformed
        );
        assert_eq!(judge(Version::HTTP_10, None, &[], local), Addressed::Here);
        assert_eq!(
            judge(
                Version::HTTP_11,
                None,
                &["localhost", "attacker.example"],
                local
            ),
            Addressed::Malformed
        );
        assert_eq!(
            judge(Version::HTTP_10, None, &["attacker.example"], local),
            Addressed::Elsewhere
        );
    }

    #[test]
    fn an_absolute_target_is_judged_by_its_authority() {
        let local = "127.0.0.1:9464";
        assert_eq!(
            judge(
                Version::HTTP_11,
                Some("attacker.example"),
                &["127.0.0.1:9464"],
                local
            ),
            Addressed::Elsewhere
        );
        assert_eq!(
            judge(
                Version::HTTP_11,
                Some("localhost:9464"),
                &["attacker.example"],
                local
            ),
            Addressed::Here
        );
    }

    #[test]
    fn a_host_that_is_not_visible_ascii_is_elsewhere() {
        let value = HeaderValue::from_bytes(b"localh\xc3\xb6st").unwrap();
        let judged = addressed(
            Version::HTTP_11,
            None,
            std::iter::once(&value),
            "127.0.0.1:9464".parse().unwrap(),
        );
        assert_eq!(judged, Addressed::Elsewhere);
    }
}
