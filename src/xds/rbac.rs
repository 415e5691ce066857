//! `envoy.filters.network.rbac` → [`RbacFilter`]: the network RBAC filter istiod puts in
//! front of `tcp_proxy` for the AuthorizationPolicies that select the gateway
//! (`pilot/pkg/security/authz/builder`). Every field a TCP connection can be judged on is
//! read; a filter using anything else (HTTP headers, metadata, CEL conditions, the matcher
//! API) is an `Err`, and the chain carrying it is not served: a policy the gateway cannot
//! evaluate must refuse, never let through what istiod denies.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as network;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::Any;

use super::any::decode;
use crate::model::{
    Cidr, RbacAction, RbacFilter, RbacPermission, RbacPolicy, RbacPrincipal, StringMatch,
    StringMatchKind,
};

/// Why a filter is not served.
#[derive(Debug, Clone, PartialEq)]
pub enum RbacError {
    /// Envoy rejects it too (HTTP rules in a network filter, a malformed value): a NACK.
    Invalid(String),
    /// Valid, but on what this gateway cannot see (metadata, filter state, CEL,
    /// extensions): the chain is not served.
    Unevaluable(String),
}

impl std::fmt::Display for RbacError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RbacError::Invalid(e) | RbacError::Unevaluable(e) => f.write_str(e),
        }
    }
}

use RbacError::{Invalid, Unevaluable};

pub const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
pub const RBAC: &str = "envoy.filters.network.rbac";

/// Nesting deeper than this is refused (istiod's policies nest three levels).
const MAX_DEPTH: usize = 32;

/// Reads one network RBAC filter's typed config.
pub fn filter(any: &Any) -> Result<RbacFilter, RbacError> {
    let f: network::Rbac = decode(any, RBAC_TYPE).map_err(Invalid)?;
    // rbac.proto (network): `stat_prefix` min_len 1.
    if f.stat_prefix.is_empty() {
        return Err(Invalid(
            "RBAC stat_prefix: must not be empty (Envoy: string min_len 1)".into(),
        ));
    }
    if f.matcher.is_some() {
        return Err(Unevaluable(
            "an RBAC matcher (the xDS matcher API) is not supported".into(),
        ));
    }
    // `shadow_rules` (istiod's dry-run policies) only count in Envoy's stats: not enforced.
    let name = f.stat_prefix.clone();
    let Some(rules) = f.rules else {
        return Ok(RbacFilter {
            name,
            action: RbacAction::Allow,
            policies: None,
        });
    };
    let action = match rbac::rbac::Action::try_from(rules.action) {
        Ok(rbac::rbac::Action::Allow) => RbacAction::Allow,
        Ok(rbac::rbac::Action::Deny) => RbacAction::Deny,
        Ok(rbac::rbac::Action::Log) => RbacAction::Log,
        Err(_) => {
            return Err(Invalid(format!(
                "RBAC action {} is not known",
                rules.action
            )));
        }
    };
    let mut named: Vec<(&String, &rbac::Policy)> = rules.policies.iter().collect();
    named.sort_by_key(|(n, _)| *n);
    let mut policies = Vec::with_capacity(named.len());
    for (pname, p) in named {
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(Unevaluable(format!(
                "RBAC policy {pname}: CEL conditions are not supported"
            )));
        }
        // config/rbac/v3/rbac.proto: a Policy's `permissions` and `principals` min_items 1.
        for (field, empty) in [
            ("permissions", p.permissions.is_empty()),
            ("principals", p.principals.is_empty()),
        ] {
            if empty {
                return Err(Invalid(format!(
                    "RBAC policy {pname}: {field}: must not be empty (Envoy: repeated min_items 1)"
                )));
            }
        }
        let in_policy = |e: RbacError| match e {
            Invalid(e) => Invalid(format!("RBAC policy {pname}: {e}")),
            Unevaluable(e) => Unevaluable(format!("RBAC policy {pname}: {e}")),
        };
        policies.push(RbacPolicy {
            name: pname.clone(),
            permissions: p
                .permissions
                .iter()
                .map(|x| permission(x, 0))
                .collect::<Result<_, _>>()
                .map_err(in_policy)?,
            principals: p
                .principals
                .iter()
                .map(|x| principal(x, 0))
                .collect::<Result<_, _>>()
                .map_err(in_policy)?,
        });
    }
    Ok(RbacFilter {
        name,
        action,
        policies: Some(policies),
    })
}

fn permission(p: &rbac::Permission, depth: usize) -> Result<RbacPermission, RbacError> {
    use rbac::permission::Rule;
    if depth > MAX_DEPTH {
        return Err(Invalid("permissions nested too deep".into()));
    }
    let set = |s: &rbac::permission::Set| -> Result<Vec<RbacPermission>, RbacError> {
        if s.rules.is_empty() {
            return Err(Invalid(
                "a permission set's rules: must not be empty (Envoy: repeated min_items 1)".into(),
            ));
        }
        s.rules.iter().map(|r| permission(r, depth + 1)).collect()
    };
    #[allow(deprecated)]
    Ok(match &p.rule {
        Some(Rule::Any(true)) => RbacPermission::Any,
        Some(Rule::AndRules(s)) => RbacPermission::And(set(s)?),
        Some(Rule::OrRules(s)) => RbacPermission::Or(set(s)?),
        Some(Rule::NotRule(r)) => RbacPermission::Not(Box::new(permission(r, depth + 1)?)),
        Some(Rule::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(port) => RbacPermission::DestinationPort(port),
            Err(_) => return Err(Invalid(format!("destination_port {port} is not a port"))),
        },
        Some(Rule::DestinationPortRange(r)) => {
            if r.start < 0 || r.end < r.start {
                return Err(Invalid(format!(
                    "destination_port_range [{}, {}) is empty",
                    r.start, r.end
                )));
            }
            RbacPermission::DestinationPortRange(r.start as u32, r.end as u32)
        }
        Some(Rule::DestinationIp(c)) => RbacPermission::DestinationIp(cidr(c).map_err(Invalid)?),
        Some(Rule::RequestedServerName(m)) => {
            RbacPermission::ServerName(string_match(m).map_err(Invalid)?)
        }
        Some(Rule::Any(false)) | None => {
            return Err(Invalid("a permission without a rule".into()));
        }
        Some(Rule::Header(_)) => return Err(http_only("permission", "header")),
        Some(Rule::UrlPath(_)) => return Err(http_only("permission", "url_path")),
        Some(Rule::Metadata(_)) => return Err(unsupported("permission", "metadata")),
        Some(Rule::SourcedMetadata(_)) => {
            return Err(unsupported("permission", "sourced_metadata"));
        }
        Some(Rule::Matcher(m)) => {
            return Err(unsupported("permission", &format!("matcher {}", m.name)));
        }
        Some(Rule::UriTemplate(_)) => return Err(unsupported("permission", "uri_template")),
    })
}

fn principal(p: &rbac::Principal, depth: usize) -> Result<RbacPrincipal, RbacError> {
    use rbac::principal::Identifier;
    if depth > MAX_DEPTH {
        return Err(Invalid("principals nested too deep".into()));
    }
    let set = |s: &rbac::principal::Set| -> Result<Vec<RbacPrincipal>, RbacError> {
        if s.ids.is_empty() {
            return Err(Invalid(
                "a principal set's ids: must not be empty (Envoy: repeated min_items 1)".into(),
            ));
        }
        s.ids.iter().map(|i| principal(i, depth + 1)).collect()
    };
    #[allow(deprecated)]
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => RbacPrincipal::Any,
        Some(Identifier::AndIds(s)) => RbacPrincipal::And(set(s)?),
        Some(Identifier::OrIds(s)) => RbacPrincipal::Or(set(s)?),
        Some(Identifier::NotId(i)) => RbacPrincipal::Not(Box::new(principal(i, depth + 1)?)),
        Some(Identifier::Authenticated(a)) => RbacPrincipal::Authenticated(
            a.principal_name
                .as_ref()
                .map(string_match)
                .transpose()
                .map_err(Invalid)?,
        ),
        Some(Identifier::SourceIp(c) | Identifier::DirectRemoteIp(c) | Identifier::RemoteIp(c)) => {
            RbacPrincipal::RemoteIp(cidr(c).map_err(Invalid)?)
        }
        Some(Identifier::Any(false)) | None => {
            return Err(Invalid("a principal without an identifier".into()));
        }
        Some(Identifier::Header(_)) => return Err(http_only("principal", "header")),
        Some(Identifier::UrlPath(_)) => return Err(http_only("principal", "url_path")),
        Some(Identifier::Metadata(_)) => return Err(unsupported("principal", "metadata")),
        Some(Identifier::FilterState(_)) => {
            return Err(unsupported("principal", "filter_state"));
        }
        Some(Identifier::SourcedMetadata(_)) => {
            return Err(unsupported("principal", "sourced_metadata"));
        }
        Some(Identifier::Custom(c)) => {
            return Err(unsupported("principal", &format!("custom {}", c.name)));
        }
    })
}

fn unsupported(what: &str, field: &str) -> RbacError {
    Unevaluable(format!(
        "a {what} on {field} cannot be evaluated on a TCP connection by this gateway"
    ))
}

/// Envoy: "rule, not supported by RBAC network filter".
fn http_only(what: &str, field: &str) -> RbacError {
    Invalid(format!(
        "a {what} on {field} is an HTTP rule, not supported by a network RBAC filter"
    ))
}

fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    let addr: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", c.address_prefix))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(max, |l| l.value);
    if len > max {
        return Err(format!("prefix length {len} is too long for {addr}"));
    }
    Ok(Cidr {
        addr,
        len: len as u8,
    })
}

/// A `StringMatcher` as string.proto and regex.proto constrain it: the `match_pattern`
/// oneof required; `prefix`, `suffix`, `contains` and a `safe_regex`'s `regex` min_bytes 1.
pub(super) fn string_match(m: &StringMatcher) -> Result<StringMatch, String> {
    let empty = match &m.match_pattern {
        Some(MatchPattern::Prefix(s)) if s.is_empty() => Some("prefix"),
        Some(MatchPattern::Suffix(s)) if s.is_empty() => Some("suffix"),
        Some(MatchPattern::Contains(s)) if s.is_empty() => Some("contains"),
        Some(MatchPattern::SafeRegex(r)) if r.regex.is_empty() => Some("safe_regex.regex"),
        _ => None,
    };
    if let Some(field) = empty {
        return Err(format!(
            "{field}: must not be empty (Envoy: string min_bytes 1)"
        ));
    }
    let kind = match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatchKind::Exact(s.clone()),
        Some(MatchPattern::Prefix(s)) => StringMatchKind::Prefix(s.clone()),
        Some(MatchPattern::Suffix(s)) => StringMatchKind::Suffix(s.clone()),
        Some(MatchPattern::Contains(s)) => StringMatchKind::Contains(s.clone()),
        Some(MatchPattern::SafeRegex(r)) => {
            return StringMatch::regex(&r.regex).map_err(|e| format!("regex {:?}: {e}", r.regex));
        }
        Some(MatchPattern::Custom(c)) => {
            return Err(format!("custom string matcher {} is not supported", c.name));
        }
        None => return Err("a string matcher without a pattern".into()),
    };
    Ok(StringMatch::new(kind, m.ignore_case))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::authz::{RbacConn, check_rbac};
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    use prost::Name;
    use rbac::{permission::Rule, principal::Identifier};
    use std::net::SocketAddr;

    fn any_of<M: prost::Message + Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    fn pattern(p: MatchPattern) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(p),
            ..Default::default()
        }
    }

    fn authenticated(m: StringMatcher) -> rbac::Principal {
        rbac::Principal {
            identifier: Some(Identifier::Authenticated(rbac::principal::Authenticated {
                principal_name: Some(m),
            })),
        }
    }

    fn filter_of(action: rbac::rbac::Action, policy: rbac::Policy) -> Any {
        any_of(&network::Rbac {
            rules: Some(rbac::Rbac {
                action: action as i32,
                policies: [("ns[istio-system]-policy[p]-rule[0]".to_string(), policy)].into(),
                ..Default::default()
            }),
            stat_prefix: "tcp.".into(),
            ..Default::default()
        })
    }

    fn conn<'a>(principal: Option<&'a str>, peer: &str, port: u16) -> RbacConn<'a> {
        RbacConn {
            principal,
            peer: peer.parse::<SocketAddr>().unwrap(),
            local: SocketAddr::from(([10, 0, 0, 1], port)),
            sni: Some("outbound_.9080_._.a.default.svc.cluster.local"),
        }
    }

    /// istiod's `namespaces: [foo]` (a full-match regex) on port 15443, with a
    /// `notId` remote IP: ALLOW matches only that namespace, that port, not that address.
    #[test]
    fn an_istiod_allow_policy_matches_as_envoy_evaluates_it() {
        let policy = rbac::Policy {
            permissions: vec![rbac::Permission {
                rule: Some(Rule::OrRules(rbac::permission::Set {
                    rules: vec![rbac::Permission {
                        rule: Some(Rule::DestinationPort(15443)),
                    }],
                })),
            }],
            principals: vec![rbac::Principal {
                identifier: Some(Identifier::AndIds(rbac::principal::Set {
                    ids: vec![
                        authenticated(pattern(MatchPattern::SafeRegex(RegexMatcher {
                            regex: ".*/ns/foo/.*".into(),
                            ..Default::default()
                        }))),
                        rbac::Principal {
                            identifier: Some(Identifier::NotId(Box::new(rbac::Principal {
                                identifier: Some(Identifier::RemoteIp(CidrRange {
                                    address_prefix: "192.168.0.0".into(),
                                    prefix_len: Some(
                                        envoy_types::pb::google::protobuf::UInt32Value {
                                            value: 16,
                                        },
                                    ),
                                })),
                            }))),
                        },
                    ],
                })),
            }],
            ..Default::default()
        };
        let f = filter(&filter_of(rbac::rbac::Action::Allow, policy)).unwrap();
        let filters = [f];
        let foo = "spiffe://cluster.local/ns/foo/sa/sleep";
        assert!(check_rbac(&filters, &conn(Some(foo), "10.1.2.3:5000", 15443)).is_ok());
        // Another port, another namespace, no identity, the excluded range.
        for c in [
            conn(Some(foo), "10.1.2.3:5000", 15012),
            conn(
                Some("spiffe://cluster.local/ns/foobar/sa/x"),
                "10.1.2.3:1",
                15443,
            ),
            conn(None, "10.1.2.3:5000", 15443),
            conn(Some(foo), "192.168.7.7:5000", 15443),
            // IPv4 on a dual-stack socket is still that address.
            conn(Some(foo), "[::ffff:192.168.7.7]:5000", 15443),
        ] {
            assert_eq!(
                check_rbac(&filters, &c),
                Err(crate::policy::authz::Denied::NotAllowed("tcp.".into()))
            );
        }
        // The regex is anchored at both ends, as Envoy's safe_regex.
        let prefix_only = "xspiffe://cluster.local/ns/foo";
        assert!(check_rbac(&filters, &conn(Some(prefix_only), "10.1.2.3:1", 15443)).is_err());
    }

    #[test]
    fn deny_names_its_policy_log_refuses_nothing_and_no_rules_allow_all() {
        let policy = rbac::Policy {
            permissions: vec![rbac::Permission {
                rule: Some(Rule::Any(true)),
            }],
            principals: vec![authenticated(pattern(MatchPattern::Exact(
                "spiffe://cluster.local/ns/foo/sa/banned".into(),
            )))],
            ..Default::default()
        };
        let banned = conn(
            Some("spiffe://cluster.local/ns/foo/sa/banned"),
            "10.0.0.9:1",
            1,
        );
        let deny = filter(&filter_of(rbac::rbac::Action::Deny, policy.clone())).unwrap();
        assert_eq!(
            check_rbac(std::slice::from_ref(&deny), &banned),
            Err(crate::policy::authz::Denied::ByDenyPolicy(
                "ns[istio-system]-policy[p]-rule[0]".into()
            ))
        );
        let log = filter(&filter_of(rbac::rbac::Action::Log, policy)).unwrap();
        assert!(check_rbac(&[log], &banned).is_ok());
        let empty = filter(&any_of(&network::Rbac {
            stat_prefix: "tcp.".into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(empty.policies, None);
        assert!(check_rbac(&[empty], &banned).is_ok());
    }

    #[test]
    fn ignore_case_folds_literal_patterns_only() {
        let m = |p: MatchPattern, ignore_case: bool| {
            string_match(&StringMatcher {
                match_pattern: Some(p),
                ignore_case,
            })
            .unwrap()
        };
        let id = "spiffe://cluster.local/ns/Foo/sa/sleep";
        let prefix = |s: &str| MatchPattern::Prefix(s.into());
        assert!(m(prefix("SPIFFE://Cluster.local/ns/foo"), true).matches(id));
        assert!(!m(prefix("SPIFFE://Cluster.local/ns/foo"), false).matches(id));
        assert!(m(MatchPattern::Exact(id.into()), false).matches(id));
        assert!(!m(MatchPattern::Suffix("SA/SLEEP".into()), false).matches(id));
        assert!(m(MatchPattern::Suffix("SA/SLEEP".into()), true).matches(id));
        assert!(m(MatchPattern::Contains("/NS/foo/".into()), true).matches(id));
    }

    /// A `safe_regex` matches the whole value, as RE2's full match in Envoy, and a pattern
    /// that is not a regular expression on its own is refused, even where wrapping it
    /// for the full match would make one (`a)|(?:b` would match anything starting with
    /// `a`).
    #[test]
    fn a_safe_regex_matches_the_whole_value_and_only_a_valid_pattern_is_taken() {
        use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
        let regex = |r: &str| {
            string_match(&pattern(MatchPattern::SafeRegex(RegexMatcher {
                regex: r.into(),
                ..Default::default()
            })))
        };
        let ns = regex(".*/ns/foo/.*").unwrap();
        assert!(ns.matches("spiffe://cluster.local/ns/foo/sa/sleep"));
        assert!(!ns.matches("spiffe://cluster.local/ns/foobar/sa/sleep"));
        let alt = regex("a|b").unwrap();
        assert!(alt.matches("a") && alt.matches("b") && !alt.matches("ab"));
        for bad in ["a)|(?:b", "a)|(b", "(a", "a)", "[a"] {
            let err = regex(bad).err();
            assert!(
                err.is_some_and(|e| e.contains("regex")),
                "{bad:?} was taken"
            );
        }
    }

    #[test]
    fn http_rules_are_invalid_and_what_cannot_be_seen_is_unevaluable() {
        use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
        let with = |id: Identifier| {
            filter(&filter_of(
                rbac::rbac::Action::Deny,
                rbac::Policy {
                    permissions: vec![rbac::Permission {
                        rule: Some(Rule::Any(true)),
                    }],
                    principals: vec![rbac::Principal {
                        identifier: Some(id),
                    }],
                    ..Default::default()
                },
            ))
        };
        assert!(matches!(
            with(Identifier::Header(HeaderMatcher::default())),
            Err(RbacError::Invalid(e)) if e.contains("HTTP rule")
        ));
        assert!(matches!(
            with(Identifier::FilterState(Default::default())),
            Err(RbacError::Unevaluable(e)) if e.contains("filter_state")
        ));
        let bad_regex = with(Identifier::Authenticated(rbac::principal::Authenticated {
            principal_name: Some(pattern(MatchPattern::SafeRegex(RegexMatcher {
                regex: "(".into(),
                ..Default::default()
            }))),
        }));
        assert!(matches!(bad_regex, Err(RbacError::Invalid(_))));
    }

    /// Envoy's rules (protoc-gen-validate annotations of the RBAC protos): each broken one
    /// is `Invalid`, a NACK, never a default or a rule left out.
    #[test]
    fn envoys_validation_rules_are_invalid_configs() {
        let any_permission = rbac::Permission {
            rule: Some(Rule::Any(true)),
        };
        let any_principal = rbac::Principal {
            identifier: Some(Identifier::Any(true)),
        };
        let policy =
            |permissions: Vec<rbac::Permission>, principals: Vec<rbac::Principal>| rbac::Policy {
                permissions,
                principals,
                ..Default::default()
            };
        let invalid = |any: Any, want: &str| match filter(&any) {
            Err(Invalid(e)) => assert!(e.contains(want), "{e} lacks {want}"),
            other => panic!("{other:?}, where {want} was expected"),
        };
        invalid(
            any_of(&network::Rbac::default()),
            "RBAC stat_prefix: must not be empty (Envoy: string min_len 1)",
        );
        invalid(
            filter_of(
                rbac::rbac::Action::Allow,
                policy(vec![], vec![any_principal.clone()]),
            ),
            "permissions: must not be empty (Envoy: repeated min_items 1)",
        );
        invalid(
            filter_of(
                rbac::rbac::Action::Allow,
                policy(vec![any_permission.clone()], vec![]),
            ),
            "principals: must not be empty (Envoy: repeated min_items 1)",
        );
        invalid(
            filter_of(
                rbac::rbac::Action::Allow,
                policy(
                    vec![rbac::Permission {
                        rule: Some(Rule::OrRules(rbac::permission::Set { rules: vec![] })),
                    }],
                    vec![any_principal.clone()],
                ),
            ),
            "rules: must not be empty",
        );
        invalid(
            filter_of(
                rbac::rbac::Action::Allow,
                policy(
                    vec![any_permission.clone()],
                    vec![rbac::Principal {
                        identifier: Some(Identifier::AndIds(rbac::principal::Set { ids: vec![] })),
                    }],
                ),
            ),
            "ids: must not be empty",
        );
        for (p, field) in [
            (MatchPattern::Prefix(String::new()), "prefix"),
            (MatchPattern::Suffix(String::new()), "suffix"),
            (MatchPattern::Contains(String::new()), "contains"),
            (
                MatchPattern::SafeRegex(RegexMatcher {
                    regex: String::new(),
                    ..Default::default()
                }),
                "safe_regex.regex",
            ),
        ] {
            let e = string_match(&pattern(p)).unwrap_err();
            assert_eq!(
                e,
                format!("{field}: must not be empty (Envoy: string min_bytes 1)")
            );
        }
        // An empty exact match is valid (no annotation): it matches the empty name only.
        assert!(string_match(&pattern(MatchPattern::Exact(String::new()))).is_ok());
    }
}
