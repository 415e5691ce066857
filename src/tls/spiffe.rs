//! SPIFFE IDs (`spiffe://trust-domain/path`), parsed and validated per the SPIFFE ID specification.
//!
//! A [`SpiffeId`] is the identity a mesh workload proves with its certificate. Parsing is
//! pure and strict: anything the specification forbids is refused with a typed reason,
//! so a peer's identity is either well-formed or not an identity at all.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// The specification caps the whole ID at 2048 bytes and the trust domain at 255.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE ID such as `spiffe://cluster.local/ns/default/sa/reviews`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID as given (it is already in canonical form once validated).
    id: String,
    /// Byte offset where the path (`/…`) starts; equals `id.len()` when there is no path.
    path_start: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    #[error("SPIFFE ID must start with \"spiffe://\" (lower-case scheme)")]
    WrongScheme,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error("SPIFFE trust domain is {0} bytes long; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    #[error("SPIFFE trust domain must not contain a port")]
    Port,
    #[error("SPIFFE ID must not contain user info (\"user@\")")]
    UserInfo,
    #[error("SPIFFE ID must not contain a query (\"?…\")")]
    Query,
    #[error("SPIFFE ID must not contain a fragment (\"#…\")")]
    Fragment,
    #[error(
        "SPIFFE trust domain has {0:?}; only lower-case letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar(char),
    #[error("SPIFFE ID path has {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
    #[error("SPIFFE ID path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("SPIFFE ID path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
}

impl SpiffeId {
    /// Parses and validates `s` as a SPIFFE ID.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        // Query and fragment are refused wherever they appear, before the finer checks,
        // so the reason names them rather than the '?' or '#' character.
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (trust_domain, path) = rest.split_at(td_len);
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        Ok(SpiffeId {
            id: s.to_owned(),
            path_start: SCHEME.len() + td_len,
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path including its leading `/`, e.g. `/ns/default/sa/reviews`; empty for a
    /// trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The whole ID, `spiffe://td/path`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The namespace of an Istio workload ID (`/ns/<ns>/sa/<sa>`); `None` for other shapes.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account of an Istio workload ID (`/ns/<ns>/sa/<sa>`); `None` for other shapes.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    /// Istio's principal form, the ID without `spiffe://` (`cluster.local/ns/x/sa/y`),
    /// as written in `AuthorizationPolicy` `principals`.
    pub fn principal(&self) -> String {
        self.id[SCHEME.len()..].to_owned()
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    match td.chars().find(|&c| !is_trust_domain_char(c)) {
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/' by construction; the first split element is the empty
    // string before it.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(if segments.peek().is_none() {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = segment.chars().find(|&c| !is_path_char(c)) {
            return Err(SpiffeIdError::PathChar(c));
        }
    }
    Ok(())
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).expect_err(s)
    }

    #[test]
    fn istio_workload_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/reviews");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("reviews"));
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/reviews");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
    }

    #[test]
    fn trust_domain_id_has_empty_path() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "");
        assert_eq!(id.namespace(), None);
        assert_eq!(id.principal(), "example.org");
    }

    #[test]
    fn non_istio_paths_have_no_namespace() {
        for s in [
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/ns/a/xx/b",
            "spiffe://td/workload/1",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.namespace(), None, "{s}");
            assert_eq!(id.service_account(), None, "{s}");
        }
    }

    #[test]
    fn refusals_name_their_reason() {
        assert_eq!(err(""), SpiffeIdError::Empty);
        assert_eq!(err("SPIFFE://td/x"), SpiffeIdError::WrongScheme);
        assert_eq!(err("https://td/x"), SpiffeIdError::WrongScheme);
        assert_eq!(err("spiffe:/td/x"), SpiffeIdError::WrongScheme);
        assert_eq!(err("spiffe://"), SpiffeIdError::EmptyTrustDomain);
        assert_eq!(err("spiffe:///ns/x"), SpiffeIdError::EmptyTrustDomain);
        assert_eq!(err("spiffe://td:8080/x"), SpiffeIdError::Port);
        assert_eq!(err("spiffe://user@td/x"), SpiffeIdError::UserInfo);
        assert_eq!(err("spiffe://td/x?a=b"), SpiffeIdError::Query);
        assert_eq!(err("spiffe://td/x#frag"), SpiffeIdError::Fragment);
        assert_eq!(err("spiffe://Td/x"), SpiffeIdError::TrustDomainChar('T'));
        assert_eq!(err("spiffe://t%64/x"), SpiffeIdError::TrustDomainChar('%'));
        assert_eq!(err("spiffe://td/a b"), SpiffeIdError::PathChar(' '));
        assert_eq!(err("spiffe://td/a%20b"), SpiffeIdError::PathChar('%'));
        assert_eq!(err("spiffe://td/é"), SpiffeIdError::PathChar('é'));
        assert_eq!(err("spiffe://td/a//b"), SpiffeIdError::EmptySegment);
        assert_eq!(err("spiffe://td//"), SpiffeIdError::EmptySegment);
        assert_eq!(err("spiffe://td/a/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://td/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://td/a/./b"), SpiffeIdError::DotSegment);
        assert_eq!(err("spiffe://td/.."), SpiffeIdError::DotSegment);
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{td}/x")).is_ok());
        let td = "a".repeat(256);
        assert_eq!(
            err(&format!("spiffe://{td}/x")),
            SpiffeIdError::TrustDomainTooLong(256)
        );
        let path = "a".repeat(2048 - "spiffe://td/".len());
        assert!(SpiffeId::parse(&format!("spiffe://td/{path}")).is_ok());
        assert_eq!(
            err(&format!("spiffe://td/{path}a")),
            SpiffeIdError::TooLong(2049)
        );
    }

    #[test]
    fn dots_inside_segments_are_allowed() {
        let id = SpiffeId::parse("spiffe://td/.hidden/a..b/...").unwrap();
        assert_eq!(id.path(), "/.hidden/a..b/...");
    }

    #[test]
    fn error_messages_explain() {
        assert_eq!(
            err("spiffe://Td/x").to_string(),
            "SPIFFE trust domain has 'T'; only lower-case letters, digits, '.', '-' and '_' are allowed"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = SpiffeId::parse(&s);
        }

        #[test]
        fn parse_never_panics_near_valid(s in "spiffe://[a-zA-Z0-9.:@?#%_/-]{0,40}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s.clone());
                prop_assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
            }
        }

        #[test]
        fn valid_ids_round_trip(
            td in "[a-z0-9._-]{1,40}",
            segments in proptest::collection::vec("[A-Za-z0-9._-]{1,12}", 0..6),
        ) {
            prop_assume!(segments.iter().all(|s| s != "." && s != ".."));
            let path: String = segments.iter().map(|s| format!("/{s}")).collect();
            let s = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&s).unwrap();
            prop_assert_eq!(id.trust_domain(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
            prop_assert_eq!(id.to_string(), s);
        }

        #[test]
        fn istio_ids_expose_namespace_and_account(
            ns in "[a-z0-9-]{1,20}", sa in "[a-z0-9-]{1,20}",
        ) {
            let id = SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap();
            prop_assert_eq!(id.namespace(), Some(ns.as_str()));
            prop_assert_eq!(id.service_account(), Some(sa.as_str()));
            prop_assert_eq!(id.principal(), format!("cluster.local/ns/{ns}/sa/{sa}"));
        }
    }
}
