//! Scope sets: the canonical form (deduplicated, sorted) that keys the token
//! cache, and the syntax check RFC 6749 section 3.3 asks of each scope.

use std::fmt;

/// A canonical set of scopes. Two requests that name the same scopes in a
/// different order or with repeats produce equal sets, so they share one
/// cached token.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeSet(Vec<String>);

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
        set.sort();
        set.dedup();
        Ok(ScopeSet(set))
    }

    /// The set an issuer reports in its space-delimited `scope` field.
    /// Tokens the issuer sends that we could not send ourselves are kept:
    /// we report what was granted, we do not judge it.
    pub fn from_granted(scope: &str) -> ScopeSet {
        let mut set: Vec<String> = scope.split_whitespace().map(str::to_owned).collect();
        set.sort();
        set.dedup();
        ScopeSet(set)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The set as the `scope` form parameter: space-joined.
    pub fn joined(&self) -> String {
        self.0.join(" ")
    }

    /// The scopes of `self` that are not in `allowed`.
    pub fn outside<'a>(&'a self, allowed: &ScopeSet) -> Vec<&'a str> {
        self.0
            .iter()
            .filter(|s| allowed.0.binary_search(s).is_err())
            .map(String::as_str)
            .collect()
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

/// `[gateway vault]`, or `[]` for the issuer's default set: for log lines.
impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.0.join(" "))
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
        assert_eq!(granted.as_slice(), ["fx", "gateway", "vault"]);
        assert!(ScopeSet::from_granted("").is_empty());
    }

    #[test]
    fn outside_lists_scopes_not_allowed() {
        let allowed = ScopeSet::new(["gateway", "vault"]).unwrap();
        let asked = ScopeSet::new(["fx", "gateway", "zz"]).unwrap();
        assert_eq!(asked.outside(&allowed), ["fx", "zz"]);
    }
}
