//! Scope sets: the canonical form (deduplicated, sorted) that keys the token
//! cache, and the syntax check RFC 6749 section 3.3 asks of each scope.
//!
//! A set is held as its space-joined text in one shared allocation, not as
//! a vector of strings: one set is the key of its cache entry, its owner's
//! identity, the scopes of its token and its audit subject, and with a
//! `Vec<String>` each of those was a copy of its own with an allocation per
//! scope (a two-letter scope costs a 32-byte chunk). That was about half of
//! the memory 10,000 cached sets took; shared, a clone is a reference
//! count. A space cannot be part of a scope, so the joined text splits back
//! into exactly the scopes it was made of.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// A canonical set of scopes. Two requests that name the same scopes in a
/// different order or with repeats produce equal sets, so they share one
/// cached token. The empty set holds no allocation.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(Option<Arc<str>>);

/// A scope that RFC 6749 would not allow on the wire.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    #[error("a scope may not be empty")]
    Empty,
    #[error(
        "scope {0:?} has a character RFC 6749 does not allow (space, quote, backslash or control)"
    )]
    BadCharacter(String),
}

/// The longest granted `scope` (the issuer's text, in bytes) a token is
/// handed out with. Far beyond any real grant (a few hundred bytes), and
/// small enough that a get answer listing it stays well inside the line
/// `tokend get` reads (src/client.rs, `MAX_TOKEN_ANSWER`).
pub const MAX_GRANTED_BYTES: usize = 64 << 10;

/// Why an issuer's granted `scope` is not one. Never repeats it: it is the
/// issuer's text, and may hold what a terminal obeys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantedScopeError {
    #[error("scope is longer than {MAX_GRANTED_BYTES} bytes")]
    TooLong,
    #[error(
        "scope is not space-separated scope-tokens of visible ASCII without quote or \
         backslash (RFC 6749 3.3)"
    )]
    BadCharacter,
}

impl ScopeSet {
    /// Canonicalises `scopes`, rejecting any that could not be sent as an
    /// RFC 6749 scope-token.
    pub fn new<I, S>(scopes: I) -> Result<ScopeSet, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = Vec::new();
        for scope in scopes {
            let scope = scope.into();
            check_token(&scope)?;
            set.push(scope);
        }
        Ok(ScopeSet::canonical(set))
    }

    /// The set an issuer reports in its `scope` field: RFC 6749 3.3
    /// scope-tokens separated by spaces (runs of them, and spaces around,
    /// are tolerated). Each must pass the rule our own scopes pass: a
    /// granted scope reaches callers, `tokend get` and the log, and one
    /// that could not be sent as a scope (a control, a bidirectional
    /// isolate, a quote) is no scope but a malformed answer. At most
    /// [`MAX_GRANTED_BYTES`], so a token answer stays within what
    /// `tokend get` reads.
    pub fn granted(scope: &str) -> Result<ScopeSet, GrantedScopeError> {
        if scope.len() > MAX_GRANTED_BYTES {
            return Err(GrantedScopeError::TooLong);
        }
        let tokens: Vec<&str> = scope.split(' ').filter(|t| !t.is_empty()).collect();
        if tokens.iter().any(|token| check_token(token).is_err()) {
            return Err(GrantedScopeError::BadCharacter);
        }
        Ok(ScopeSet::canonical(tokens))
    }

    /// A granted set without the checks of [`ScopeSet::granted`], for
    /// tests of what shows a set (sorting, encoding) whatever it holds.
    #[cfg(test)]
    pub(crate) fn from_granted(scope: &str) -> ScopeSet {
        ScopeSet::canonical(scope.split_whitespace().collect())
    }

    /// Sorted, deduplicated and joined. Every scope is non-empty and holds
    /// no whitespace, which is what makes [`ScopeSet::iter`] exact.
    fn canonical<S: AsRef<str> + Ord>(mut set: Vec<S>) -> ScopeSet {
        set.sort();
        set.dedup();
        if set.is_empty() {
            return ScopeSet(None);
        }
        let mut joined = String::with_capacity(set.iter().map(|s| s.as_ref().len() + 1).sum());
        for (i, scope) in set.iter().enumerate() {
            if i > 0 {
                joined.push(' ');
            }
            joined.push_str(scope.as_ref());
        }
        ScopeSet(Some(Arc::from(joined)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The scopes, in canonical (sorted) order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + Clone {
        self.0
            .as_deref()
            .into_iter()
            .flat_map(|joined| joined.split(' '))
    }

    /// The set as the `scope` form parameter: space-joined.
    pub fn joined(&self) -> &str {
        self.0.as_deref().unwrap_or_default()
    }

    /// The scopes of `self` that are not in `allowed`: one walk over both,
    /// which are sorted.
    pub fn outside<'a>(&'a self, allowed: &ScopeSet) -> Vec<&'a str> {
        let mut allowed = allowed.iter().peekable();
        self.iter()
            .filter(|scope| {
                while allowed.next_if(|a| a < scope).is_some() {}
                allowed.peek() != Some(scope)
            })
            .collect()
    }
}

/// Scope by scope, as a list of them would compare: `status` sorts its sets
/// so, and the joined text would not where a granted scope holds a byte
/// below the space.
impl Ord for ScopeSet {
    fn cmp(&self, other: &Self) -> Ordering {
        self.iter().cmp(other.iter())
    }
}

impl PartialOrd for ScopeSet {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// `[gateway vault]`, or `[]` for the issuer's default set: for log lines.
impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.joined())
    }
}

/// RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
fn check_token(scope: &str) -> Result<(), ScopeError> {
    if scope.is_empty() {
        return Err(ScopeError::Empty);
    }
    let allowed = |b: u8| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b);
    if scope.bytes().all(allowed) {
        Ok(())
    } else {
        Err(ScopeError::BadCharacter(scope.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_sorts_and_deduplicates() {
        let a = ScopeSet::new(["vault", "gateway", "vault"]).unwrap();
        let b = ScopeSet::new(["gateway", "vault"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.joined(), "gateway vault");
        assert!(ScopeSet::new(Vec::<String>::new()).unwrap().is_empty());
    }

    #[test]
    fn rejects_what_cannot_go_on_the_wire() {
        assert_eq!(ScopeSet::new([""]), Err(ScopeError::Empty));
        for bad in ["a b", "quo\"te", "back\\slash", "tab\t", "é"] {
            assert!(
                matches!(ScopeSet::new([bad]), Err(ScopeError::BadCharacter(_))),
                "{bad:?}"
            );
        }
        assert!(ScopeSet::new(["read:all", "https://api.example/x", "a+b%"]).is_ok());
    }

    #[test]
    fn granted_scope_is_split_on_whitespace() {
        let granted = ScopeSet::from_granted(" vault  fx gateway fx ");
        assert_eq!(
            granted.iter().collect::<Vec<_>>(),
            ["fx", "gateway", "vault"]
        );
        assert_eq!(granted, ScopeSet::new(["vault", "gateway", "fx"]).unwrap());
        assert!(ScopeSet::from_granted("").is_empty());
    }

    #[test]
    fn a_granted_scope_follows_the_rule_our_own_scopes_follow() {
        let granted = ScopeSet::granted(" vault  fx gateway fx ").unwrap();
        assert_eq!(granted, ScopeSet::new(["vault", "gateway", "fx"]).unwrap());
        assert!(ScopeSet::granted("").unwrap().is_empty());
        assert!(ScopeSet::granted("   ").unwrap().is_empty());
        for bad in [
            "read\u{2066}",
            "gateway \u{1b}]0;x\u{7}",
            "a\tb",
            "a\u{a0}b",
            "vault:é",
            "quo\"te",
            "back\\slash",
            "a\nb",
        ] {
            assert_eq!(
                ScopeSet::granted(bad),
                Err(GrantedScopeError::BadCharacter),
                "{bad:?}"
            );
        }
        let message = GrantedScopeError::BadCharacter.to_string();
        assert!(message.starts_with("scope "), "{message}");
    }

    #[test]
    fn a_granted_scope_is_bounded() {
        let at_limit = "a ".repeat(MAX_GRANTED_BYTES / 2);
        assert_eq!(at_limit.len(), MAX_GRANTED_BYTES);
        assert_eq!(ScopeSet::granted(&at_limit).unwrap().iter().count(), 1);
        let over = format!("{at_limit}b");
        assert_eq!(ScopeSet::granted(&over), Err(GrantedScopeError::TooLong));
    }

    #[test]
    fn outside_lists_scopes_not_allowed() {
        let allowed = ScopeSet::new(["gateway", "vault"]).unwrap();
        let asked = ScopeSet::new(["fx", "gateway", "zz"]).unwrap();
        assert_eq!(asked.outside(&allowed), ["fx", "zz"]);
        assert_eq!(allowed.outside(&asked), ["vault"]);
        assert!(allowed.outside(&allowed).is_empty());
        assert_eq!(allowed.outside(&ScopeSet::default()), ["gateway", "vault"]);
        assert!(ScopeSet::default().outside(&allowed).is_empty());
    }

    #[test]
    fn sets_order_scope_by_scope() {
        let set = |s: &[&str]| ScopeSet::from_granted(&s.join(" "));
        // Scope by scope "a" < "a\u{1}"; joined, "a b" would sort after
        // "a\u{1}" (an issuer may grant scopes with control characters).
        assert!(set(&["a", "b"]) < set(&["a\u{1}"]));
        assert!(set(&["a", "b"]) < set(&["a!"]));
        assert!(set(&[]) < set(&["a"]));
        assert!(set(&["a"]) < set(&["a", "b"]));
        let mut sorted = vec![set(&["b"]), set(&["a", "c"]), set(&[]), set(&["a"])];
        sorted.sort();
        assert_eq!(
            sorted,
            [set(&[]), set(&["a"]), set(&["a", "c"]), set(&["b"])]
        );
    }

    #[test]
    fn the_empty_set_holds_nothing() {
        assert_eq!(
            ScopeSet::new(Vec::<String>::new()).unwrap(),
            ScopeSet::default()
        );
        assert_eq!(ScopeSet::from_granted("  "), ScopeSet::default());
        assert_eq!(ScopeSet::default().iter().count(), 0);
        assert_eq!(ScopeSet::default().joined(), "");
        assert_eq!(format!("{}", ScopeSet::default()), "[]");
        assert_eq!(
            format!("{:?}", ScopeSet::from_granted("b a")),
            r#"["a", "b"]"#
        );
    }
}
