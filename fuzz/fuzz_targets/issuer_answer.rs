//! Fuzzes `issuer::parse_answer`, the parser of whatever a token endpoint
//! (or a proxy in front of it) sends back.
//!
//! Input layout, so seeds stay readable: a first line `STATUS CONTENT-TYPE`
//! and the body after its `\n`. STATUS is any decimal `u16` (inputs whose
//! first word is not one are skipped); the content type is the rest of the
//! line, invalid UTF-8 replaced. Without a `\n` the body is empty.
//!
//! `parse_answer` must return; a failure must read as one bounded line (it
//! goes into logs and `status` answers); a `Grant`'s token must be visible
//! ASCII (RFC 6749 A.12), its token type one visible word, and its granted
//! scopes free of control characters (all three reach callers' terminals);
//! a `Grant`'s `Debug` must not depend on the access token, and must not
//! contain the token's text unless the other fields happen to contain it
//! too. HTTP, headers and `Retry-After`
//! are the client's part and not fuzzed here.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokend::issuer::{parse_answer, Grant, Scrubber};
use tokend::secret::AccessToken;

/// issuer.rs repeats at most 300 characters (`MAX_WORDS`) of the issuer's
/// own text; the rest of a failure message is a fixed sentence.
const MAX_FAILURE_CHARS: usize = 512;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(end) => (&data[..end], &data[end + 1..]),
        None => (data, &b""[..]),
    };
    let head = String::from_utf8_lossy(head);
    let (status, content_type) = head.split_once(' ').unwrap_or((&head, ""));
    let Ok(status) = status.parse::<u16>() else {
        return;
    };
    match parse_answer(status, content_type, body, &Scrubber::none()) {
        Ok(grant) => check_grant(&grant),
        Err(failure) => {
            let shown = failure.to_string();
            assert!(
                !shown.chars().any(char::is_control),
                "failure spans lines or carries control characters: {shown:?}"
            );
            assert!(
                shown.chars().count() <= MAX_FAILURE_CHARS,
                "failure of {} characters",
                shown.chars().count()
            );
        }
    }
});

fn check_grant(grant: &Grant) {
    let token = grant.access_token.expose();
    assert!(!token.is_empty(), "empty access token granted");
    assert!(
        token.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "a token outside visible ASCII granted"
    );
    assert!(
        !grant.token_type.is_empty() && grant.token_type.bytes().all(|b| b.is_ascii_graphic()),
        "token type {:?} granted",
        grant.token_type
    );
    let control = (grant.scope.iter())
        .flat_map(|set| set.iter())
        .any(|scope| scope.chars().any(char::is_control));
    assert!(
        !control,
        "a control character in granted scopes {:?}",
        grant.scope
    );
    let shown = format!("{grant:?}");
    let swapped = Grant {
        access_token: AccessToken::new(format!("{token}-other")),
        ..grant.clone()
    };
    assert_eq!(
        shown,
        format!("{swapped:?}"),
        "Debug of a Grant depends on its token"
    );
    // The token's text may legitimately appear elsewhere (a token "Bearer"
    // or "Some"); it must not appear because of the token field.
    let blank = format!(
        "{:?}",
        Grant {
            access_token: AccessToken::new(String::new()),
            ..grant.clone()
        }
    );
    assert!(
        !shown.contains(token) || blank.contains(token),
        "Debug of a Grant shows its token: {shown}"
    );
}
