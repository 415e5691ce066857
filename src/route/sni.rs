//! Istio subset keys carried in SNI: `outbound_.<port>_.<subset>_.<host>`.
//!
//! Sidecars use the DNS-SRV form of the cluster name as the TLS SNI towards another
//! network (`BuildDNSSrvSubsetKey` in Istio's `pilot/pkg/model/service.go`), e.g.
//! `outbound_.9080_._.reviews.default.svc.cluster.local` (no subset: the subset is the
//! empty string between two `_.` separators) or `outbound_.9080_.v2_.reviews.default.svc.cluster.local`.
//! The gateway routes on the port, subset and host read back from it.
//!
//! An SNI is a DNS name and compares without regard to case (RFC 4343; Envoy matches
//! filter-chain `server_names` so since envoyproxy/envoy#14793): the whole name, prefix
//! and subset included, is lower-cased ([`lower_case`]) before it is parsed and matched.

/// The `(port, subset, host)` a client asked for in its SNI, borrowed from the SNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubsetKey<'a> {
    /// The service port (not the endpoint's target port).
    pub port: u16,
    /// The DestinationRule subset; `None` for the whole service.
    pub subset: Option<&'a str>,
    /// The service host, lower-case when the name was [`lower_case`]d first.
    pub host: &'a str,
}

/// Why an SNI is not a routable Istio outbound subset key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniMiss {
    #[error(
        "SNI is not an Istio subset key: it must start with `outbound_.` (as in outbound_.9080_._.reviews.default.svc.cluster.local)"
    )]
    NotSubsetKey,
    #[error(
        "SNI is an inbound subset key (`inbound_.`); the gateway routes only outbound keys sent by sidecars in other networks"
    )]
    Inbound,
    #[error(
        "SNI subset key has fewer than three `_.` separators; expected outbound_.<port>_.<subset>_.<host> (empty subset: outbound_.<port>_._.<host>)"
    )]
    MissingSeparator,
    #[error("SNI subset key has a `_.` separator inside the host; host names cannot contain `_.`")]
    ExtraSeparator,
    #[error(
        "SNI subset key port is not a decimal number in 1..=65535 without sign or leading zeros"
    )]
    BadPort,
    #[error(
        "SNI subset key subset name is not a DNS-1123 label (lowercase letters, digits and '-', at most 63, starting and ending alphanumeric)"
    )]
    InvalidSubset,
    #[error("SNI subset key has an empty host")]
    EmptyHost,
    #[error(
        "SNI subset key host is not a DNS name (letters, digits, '-' and non-empty labels of at most 63 separated by '.', at most 253 in all)"
    )]
    InvalidHost,
}

impl SniMiss {
    /// A short snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SniMiss::NotSubsetKey => "not_subset_key",
            SniMiss::Inbound => "inbound_key",
            SniMiss::MissingSeparator => "missing_separator",
            SniMiss::ExtraSeparator => "extra_separator",
            SniMiss::BadPort => "bad_port",
            SniMiss::InvalidSubset => "invalid_subset",
            SniMiss::EmptyHost => "empty_host",
            SniMiss::InvalidHost => "invalid_host",
        }
    }
}

const OUTBOUND: &str = "outbound_.";
const INBOUND: &str = "inbound_.";
const SEP: &str = "_.";

/// The longest name that can be a subset key: the prefix, a five-digit port, a 63-byte
/// subset label and a 253-byte host, with their separators.
const MAX_KEY_LEN: usize = OUTBOUND.len() + 5 + SEP.len() + 63 + SEP.len() + 253;

/// An SNI with its ASCII letters lower-cased, the form it is parsed and matched in.
///
/// Borrowed when the name is lower-case already (what sidecars send), copied onto the
/// stack when it is short enough to be a subset key, and onto the heap only when it is
/// too long to be one (a refusal, which allocates its reason anyway).
pub struct LowerSni<'a>(Folded<'a>);

#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack for one synchronous call; boxing the buffer is the allocation it avoids"
)]
enum Folded<'a> {
    Borrowed(&'a str),
    Inline {
        len: usize,
        bytes: [u8; MAX_KEY_LEN],
    },
    Owned(String),
}

/// Lower-cases `sni` for parsing and matching (RFC 4343 compares DNS names without
/// regard to ASCII case). Only ASCII bytes change, so the result is valid UTF-8.
pub fn lower_case(sni: &str) -> LowerSni<'_> {
    if !sni.bytes().any(|b| b.is_ascii_uppercase()) {
        return LowerSni(Folded::Borrowed(sni));
    }
    if sni.len() > MAX_KEY_LEN {
        return LowerSni(Folded::Owned(sni.to_ascii_lowercase()));
    }
    let mut bytes = [0u8; MAX_KEY_LEN];
    let inline = &mut bytes[..sni.len()];
    inline.copy_from_slice(sni.as_bytes());
    inline.make_ascii_lowercase();
    LowerSni(Folded::Inline {
        len: sni.len(),
        bytes,
    })
}

impl LowerSni<'_> {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Folded::Borrowed(s) => s,
            // Lower-casing ASCII bytes of a `str` leaves valid UTF-8, so this never falls
            // back to the empty name.
            Folded::Inline { len, bytes } => std::str::from_utf8(&bytes[..*len]).unwrap_or(""),
            Folded::Owned(s) => s,
        }
    }
}

impl std::ops::Deref for LowerSni<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Parse an SNI as an Istio outbound subset key.
///
/// Reads the name in the form [`lower_case`] gives it: the prefix is `outbound_.` and the
/// subset a DNS-1123 label, both lower-case; a name not lower-cased first is refused for
/// an upper-case prefix or subset (its host may be in any case).
pub fn parse_subset_key(sni: &str) -> Result<SubsetKey<'_>, SniMiss> {
    let Some(rest) = sni.strip_prefix(OUTBOUND) else {
        return Err(if sni.starts_with(INBOUND) {
            SniMiss::Inbound
        } else {
            SniMiss::NotSubsetKey
        });
    };
    let (port, rest) = split_sep(rest).ok_or(SniMiss::MissingSeparator)?;
    let (subset, host) = split_sep(rest).ok_or(SniMiss::MissingSeparator)?;
    let port = parse_port(port).ok_or(SniMiss::BadPort)?;
    let subset = match subset {
        "" => None,
        s if is_dns1123_label(s) => Some(s),
        _ => return Err(SniMiss::InvalidSubset),
    };
    if host.is_empty() {
        return Err(SniMiss::EmptyHost);
    }
    if !is_dns_name(host) {
        // Host names have no `_`, so a fourth separator is caught here; name it precisely.
        return Err(if split_sep(host).is_some() {
            SniMiss::ExtraSeparator
        } else {
            SniMiss::InvalidHost
        });
    }
    Ok(SubsetKey { port, subset, host })
}

/// Build the SNI a sidecar sends for `(port, subset, host)`, the inverse of [`parse_subset_key`].
pub fn build_subset_key(port: u16, subset: Option<&str>, host: &str) -> String {
    let subset = subset.unwrap_or("");
    // "outbound_." + up to 5 digits + "_." + subset + "_." + host
    let mut key =
        String::with_capacity(OUTBOUND.len() + 5 + 2 * SEP.len() + subset.len() + host.len());
    key.push_str(OUTBOUND);
    // Writing into a String cannot fail.
    let _ = std::fmt::Write::write_fmt(&mut key, format_args!("{port}"));
    key.push_str(SEP);
    key.push_str(subset);
    key.push_str(SEP);
    key.push_str(host);
    key
}

/// Split at the first `_.`. A byte scan: this runs per connection, and `str::split_once`
/// with a string pattern sets up a substring searcher that costs more than the scan.
fn split_sep(s: &str) -> Option<(&str, &str)> {
    let bytes = s.as_bytes();
    let mut from = 0;
    let at = loop {
        let at = from + bytes.get(from..)?.iter().position(|&c| c == b'_')?;
        if bytes.get(at + 1) == Some(&b'.') {
            break at;
        }
        from = at + 1;
    };
    // `_` is ASCII, so both cut points are char boundaries and `get` cannot fail.
    Some((s.get(..at)?, s.get(at + SEP.len()..)?))
}

/// Decimal 1..=65535, digits only, no leading zero (sidecars write ports with `strconv.Itoa`).
fn parse_port(s: &str) -> Option<u16> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 5 || bytes.first() == Some(&b'0') {
        return None;
    }
    let mut value: u32 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(b - b'0');
    }
    u16::try_from(value).ok()
}

/// Kubernetes DNS-1123 label, which Istio requires of DestinationRule subset names.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// A DNS host name: labels of letters, digits and `-`, 1..=63 bytes each, 253 in all.
fn is_dns_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 253
        // One branch-free pass over the bytes, then the label structure.
        && b.iter().fold(true, |ok, &c| ok & HOST_BYTE[usize::from(c)])
        && b.split(|&c| c == b'.').all(|label| (1..=63).contains(&label.len()))
}

/// Bytes allowed in a host name: `[A-Za-z0-9.-]`.
static HOST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        c += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_subset_key() {
        let key = parse_subset_key("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(
            key,
            SubsetKey {
                port: 9080,
                subset: None,
                host: "reviews.default.svc.cluster.local"
            }
        );
    }

    #[test]
    fn subset_key() {
        let key =
            parse_subset_key("outbound_.9080_.v2_.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(key.port, 9080);
        assert_eq!(key.subset, Some("v2"));
        assert_eq!(key.host, "reviews.default.svc.cluster.local");
        let key = parse_subset_key("outbound_.65535_.canary-1_.a").unwrap();
        assert_eq!(
            (key.port, key.subset, key.host),
            (65535, Some("canary-1"), "a")
        );
    }

    #[test]
    fn host_case_is_preserved() {
        let key = parse_subset_key("outbound_.443_._.Reviews.Default.SVC.cluster.local").unwrap();
        assert_eq!(key.host, "Reviews.Default.SVC.cluster.local");
    }

    #[test]
    fn lower_case_folds_the_whole_name() {
        let sni = "OUTBOUND_.9080_.V2_.Reviews.DEFAULT.svc.cluster.local";
        let lower = lower_case(sni);
        assert_eq!(
            &*lower,
            "outbound_.9080_.v2_.reviews.default.svc.cluster.local"
        );
        let key = parse_subset_key(&lower).unwrap();
        assert_eq!(
            (key.port, key.subset, key.host),
            (9080, Some("v2"), "reviews.default.svc.cluster.local")
        );
        // Names already lower-case are read in place.
        let sni = "outbound_.9080_._.reviews.default.svc.cluster.local";
        assert!(matches!(lower_case(sni).0, Folded::Borrowed(s) if std::ptr::eq(s, sni)));
        // The longest possible key fits on the stack; only longer names are copied to the heap.
        let longest = format!("OUTBOUND_.65535_.{}_.{}A", "V".repeat(63), "A.".repeat(126));
        assert_eq!(longest.len(), MAX_KEY_LEN);
        assert!(matches!(lower_case(&longest).0, Folded::Inline { .. }));
        assert_eq!(*lower_case(&longest), longest.to_ascii_lowercase());
        assert!(parse_subset_key(&lower_case(&longest)).is_ok());
        let longer = format!("{longest}A");
        assert!(matches!(lower_case(&longer).0, Folded::Owned(_)));
        assert_eq!(
            parse_subset_key(&lower_case(&longer)),
            Err(SniMiss::InvalidHost)
        );
        // Only ASCII letters fold; other bytes stay as they are.
        assert_eq!(
            &*lower_case("OUTBOUND_.1_._.RÉVIEWS"),
            "outbound_.1_._.rÉviews"
        );
        assert_eq!(
            parse_subset_key(&lower_case("INBOUND_.9080_._.REVIEWS")),
            Err(SniMiss::Inbound)
        );
    }

    #[test]
    fn build_matches_istio_format() {
        assert_eq!(
            build_subset_key(9080, None, "reviews.default.svc.cluster.local"),
            "outbound_.9080_._.reviews.default.svc.cluster.local"
        );
        assert_eq!(
            build_subset_key(9080, Some("v2"), "reviews.default.svc.cluster.local"),
            "outbound_.9080_.v2_.reviews.default.svc.cluster.local"
        );
        // An empty subset is how Istio spells "no subset".
        assert_eq!(
            build_subset_key(1, Some(""), "h"),
            build_subset_key(1, None, "h")
        );
    }

    #[test]
    fn misses_are_typed() {
        let cases: &[(&str, SniMiss)] = &[
            ("reviews.default.svc.cluster.local", SniMiss::NotSubsetKey),
            ("", SniMiss::NotSubsetKey),
            (
                "outbound|9080||reviews.default.svc.cluster.local",
                SniMiss::NotSubsetKey,
            ),
            ("OUTBOUND_.9080_._.reviews", SniMiss::NotSubsetKey),
            ("outbound.9080_._.reviews", SniMiss::NotSubsetKey),
            (
                "inbound_.9080_._.reviews.default.svc.cluster.local",
                SniMiss::Inbound,
            ),
            ("outbound_.", SniMiss::MissingSeparator),
            (
                "outbound_.9080_.reviews.default.svc.cluster.local",
                SniMiss::MissingSeparator,
            ),
            ("outbound_.9080", SniMiss::MissingSeparator),
            (
                "outbound_.9080_._.reviews_.default",
                SniMiss::ExtraSeparator,
            ),
            ("outbound_.9080_.v1_.v2_.reviews", SniMiss::ExtraSeparator),
            ("outbound_.9080_._._.", SniMiss::ExtraSeparator),
            ("outbound_._._.reviews", SniMiss::BadPort),
            ("outbound_.0_._.reviews", SniMiss::BadPort),
            ("outbound_.65536_._.reviews", SniMiss::BadPort),
            ("outbound_.99999_._.reviews", SniMiss::BadPort),
            ("outbound_.123456_._.reviews", SniMiss::BadPort),
            ("outbound_.+9080_._.reviews", SniMiss::BadPort),
            ("outbound_.-1_._.reviews", SniMiss::BadPort),
            ("outbound_.09080_._.reviews", SniMiss::BadPort),
            ("outbound_. 9080_._.reviews", SniMiss::BadPort),
            ("outbound_.9080a_._.reviews", SniMiss::BadPort),
            ("outbound_.9080_.V2_.reviews", SniMiss::InvalidSubset),
            ("outbound_.9080_.-v2_.reviews", SniMiss::InvalidSubset),
            ("outbound_.9080_.v2-_.reviews", SniMiss::InvalidSubset),
            ("outbound_.9080_.v.2_.reviews", SniMiss::InvalidSubset),
            ("outbound_.9080_.v_2_.reviews", SniMiss::InvalidSubset),
            ("outbound_.9080_._.", SniMiss::EmptyHost),
            ("outbound_.9080_.v1_.", SniMiss::EmptyHost),
            ("outbound_.9080_._.reviews..svc", SniMiss::InvalidHost),
            ("outbound_.9080_._..reviews", SniMiss::InvalidHost),
            ("outbound_.9080_._.reviews.", SniMiss::InvalidHost),
            ("outbound_.9080_._.rev_iews", SniMiss::InvalidHost),
            ("outbound_.9080_._.*.svc", SniMiss::InvalidHost),
            ("outbound_.9080_._.réviews", SniMiss::InvalidHost),
            ("outbound_.9080_._.a b", SniMiss::InvalidHost),
        ];
        for (sni, miss) in cases {
            assert_eq!(parse_subset_key(sni), Err(*miss), "{sni:?}");
        }
        let long_subset = format!("outbound_.1_.{}_.h", "a".repeat(64));
        assert_eq!(parse_subset_key(&long_subset), Err(SniMiss::InvalidSubset));
        let ok_subset = format!("outbound_.1_.{}_.h", "a".repeat(63));
        assert!(parse_subset_key(&ok_subset).is_ok());
        let long_label = format!("outbound_.1_._.{}.svc", "a".repeat(64));
        assert_eq!(parse_subset_key(&long_label), Err(SniMiss::InvalidHost));
        let long_host = format!("outbound_.1_._.{}aa", "a.".repeat(126));
        assert_eq!(parse_subset_key(&long_host), Err(SniMiss::InvalidHost));
        let max_host = format!("outbound_.1_._.{}a", "a.".repeat(126));
        assert_eq!(parse_subset_key(&max_host).map(|k| k.host.len()), Ok(253));
    }

    #[test]
    fn reasons_and_messages() {
        assert_eq!(SniMiss::Inbound.reason(), "inbound_key");
        assert_eq!(SniMiss::NotSubsetKey.reason(), "not_subset_key");
        assert_eq!(SniMiss::BadPort.reason(), "bad_port");
        assert!(
            SniMiss::MissingSeparator
                .to_string()
                .contains("outbound_.<port>_._.<host>")
        );
        assert!(
            SniMiss::Inbound
                .to_string()
                .contains("routes only outbound")
        );
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn host() -> impl Strategy<Value = String> {
        proptest::collection::vec("[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", 1..6)
            .prop_map(|labels| labels.join("."))
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,200}") {
            let _ = parse_subset_key(&s);
        }

        #[test]
        fn arbitrary_keys_never_panic(s in "outbound_\\.[0-9_.a-zA-Z-]{0,80}") {
            if let Ok(key) = parse_subset_key(&s) {
                prop_assert_eq!(build_subset_key(key.port, key.subset, key.host), s);
            }
        }

        #[test]
        fn any_case_parses_as_the_lower_case_name(s in "(?i)outbound_\\.[0-9]{1,5}_\\.([a-z0-9-]{0,8})_\\.[a-z0-9.-]{0,40}") {
            let folded = lower_case(&s);
            let lower = s.to_ascii_lowercase();
            prop_assert_eq!(parse_subset_key(&folded), parse_subset_key(&lower));
        }

        #[test]
        fn build_then_parse_round_trips(
            port in 1u16..,
            subset in proptest::option::of(label()),
            host in host(),
        ) {
            let sni = build_subset_key(port, subset.as_deref(), &host);
            let key = parse_subset_key(&sni).unwrap();
            prop_assert_eq!(key, SubsetKey { port, subset: subset.as_deref(), host: &host });
        }
    }
}
