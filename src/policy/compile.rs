//! AuthorizationPolicy → network RBAC, as istiod compiles it for a gateway's TCP filter
//! chains (`pilot/pkg/security/authz/builder` and `.../authz/model` in istio/istio): one
//! DENY filter, then one ALLOW filter, each holding one policy per rule, named
//! `ns[<namespace>]-policy[<name>]-rule[<index>]`. A rule's `from` entries are its
//! principals, its `to` entries its permissions; within one entry every field must match,
//! within one field any value. Principals become `spiffe://` URIs (written with the mesh
//! trust domain or an alias, or with `cluster.local`, they are expanded to every one of
//! them), namespaces the regular expression `.*/ns/<namespace>/.*` on the peer's URI,
//! ports the connection's destination port. Files and istiod thus feed the data path the
//! same [`RbacFilter`]s, judged by one evaluator ([`super::authz::check_rbac`]).

use crate::model::{
    Cidr, RbacAction, RbacFilter, RbacPermission, RbacPolicy, RbacPrincipal, StringMatch,
    StringMatchKind,
};

/// An `AuthorizationPolicy` that selects the gateway, as read from its YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// One `rules[]` entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rule {
    /// `from[].source`; an entry without `source` matches any peer.
    pub from: Vec<Source>,
    /// `to[].operation`; an entry without `operation` matches any connection.
    pub to: Vec<Operation>,
    /// `when[]`: conditions every `from` and `to` entry must also meet.
    pub when: Vec<Condition>,
    /// The rule names a condition that cannot be judged on a TCP connection (HTTP
    /// methods, paths, request principals…). As istiod does for a TCP filter chain, an
    /// ALLOW rule holding one is left out (it never allows); in a DENY rule the reader
    /// has already dropped the condition, so the rule matches more.
    pub unevaluable: bool,
}

/// `from[].source`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// `serviceAccounts`: `<namespace>/<name>`, or `<name>` in the policy's namespace.
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    /// `ipBlocks` and `remoteIpBlocks` (and their negations): the gateway reads no PROXY
    /// protocol or forwarded headers, so both are the peer's address.
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    pub remote_ip_blocks: Vec<Cidr>,
    pub not_remote_ip_blocks: Vec<Cidr>,
}

/// One `when` condition on what a TCP connection shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// The `when` keys a TCP connection can be judged on (istiod's attribute names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKey {
    /// `source.ip` and `remote.ip`: the peer's address.
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    DestinationIp,
    DestinationPort,
    /// `connection.sni`.
    ConnectionSni,
}

impl ConditionKey {
    pub fn parse(key: &str) -> Option<ConditionKey> {
        Some(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "source.serviceAccount" => ConditionKey::SourceServiceAccount,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            _ => return None,
        })
    }

    /// Whether the condition is on the connection (a permission) rather than the peer.
    fn on_destination(self) -> bool {
        matches!(
            self,
            ConditionKey::DestinationIp
                | ConditionKey::DestinationPort
                | ConditionKey::ConnectionSni
        )
    }
}

/// `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// The policies' RBAC filters: DENY first, then ALLOW, each present only when a policy
/// has that action; none at all without policies. `trust_domains` is the mesh trust
/// domain followed by its aliases.
pub fn compile(policies: &[AuthorizationPolicy], trust_domains: &[String]) -> Vec<RbacFilter> {
    [
        (Action::Deny, RbacAction::Deny),
        (Action::Allow, RbacAction::Allow),
    ]
    .into_iter()
    .filter_map(|(action, rbac_action)| {
        let of_action: Vec<&AuthorizationPolicy> =
            policies.iter().filter(|p| p.action == action).collect();
        if of_action.is_empty() {
            return None;
        }
        let mut rules: Vec<RbacPolicy> = of_action
            .iter()
            .flat_map(|p| policy_rules(p, trust_domains))
            .collect();
        // istiod's policies are a map: Envoy (and the xDS reader) see them by name.
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        Some(RbacFilter {
            name: of_action
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect::<Vec<_>>()
                .join(", "),
            action: rbac_action,
            policies: Some(rules),
        })
    })
    .collect()
}

fn policy_rules(p: &AuthorizationPolicy, trust_domains: &[String]) -> Vec<RbacPolicy> {
    let name = |i: usize| format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name);
    if p.rules.is_empty() {
        // A policy without rules: an explicit policy that never matches.
        return vec![RbacPolicy {
            name: name(0),
            permissions: vec![RbacPermission::Not(Box::new(RbacPermission::Any))],
            principals: vec![RbacPrincipal::Not(Box::new(RbacPrincipal::Any))],
        }];
    }
    p.rules
        .iter()
        .enumerate()
        .filter(|(_, r)| !(r.unevaluable && p.action == Action::Allow))
        .map(|(i, r)| RbacPolicy {
            name: name(i),
            permissions: if r.to.is_empty() {
                vec![permission(&Operation::default(), &r.when)]
            } else {
                r.to.iter().map(|o| permission(o, &r.when)).collect()
            },
            principals: if r.from.is_empty() {
                vec![principal(
                    &Source::default(),
                    &r.when,
                    &p.namespace,
                    trust_domains,
                )]
            } else {
                r.from
                    .iter()
                    .map(|s| principal(s, &r.when, &p.namespace, trust_domains))
                    .collect()
            },
        })
        .collect()
}

/// One `to` entry, then the rule's conditions on the connection, in istiod's order.
fn permission(o: &Operation, when: &[Condition]) -> RbacPermission {
    let ports = |ports: &[u16]| {
        RbacPermission::Or(
            ports
                .iter()
                .map(|p| RbacPermission::DestinationPort(*p))
                .collect(),
        )
    };
    let mut and = Vec::new();
    if !o.ports.is_empty() {
        and.push(ports(&o.ports));
    }
    if !o.not_ports.is_empty() {
        and.push(RbacPermission::Not(Box::new(ports(&o.not_ports))));
    }
    for c in when.iter().filter(|c| c.key.on_destination()) {
        let each = |values: &[String]| -> Vec<RbacPermission> {
            values
                .iter()
                .filter_map(|v| match c.key {
                    ConditionKey::DestinationPort => {
                        v.parse().ok().map(RbacPermission::DestinationPort)
                    }
                    ConditionKey::DestinationIp => parse_cidr(v).map(RbacPermission::DestinationIp),
                    _ => Some(RbacPermission::ServerName(plain_matcher(v))),
                })
                .collect()
        };
        let (values, not_values) = (each(&c.values), each(&c.not_values));
        if !values.is_empty() {
            and.push(RbacPermission::Or(values));
        }
        if !not_values.is_empty() {
            and.push(RbacPermission::Not(Box::new(RbacPermission::Or(
                not_values,
            ))));
        }
    }
    if and.is_empty() {
        and.push(RbacPermission::Any);
    }
    RbacPermission::And(and)
}

/// One `from` entry of a policy in `namespace`, then the rule's conditions on the peer, in
/// istiod's order.
fn principal(
    s: &Source,
    when: &[Condition],
    namespace: &str,
    trust_domains: &[String],
) -> RbacPrincipal {
    let mut and = Vec::new();
    let mut field = |values: Vec<RbacPrincipal>, not_values: Vec<RbacPrincipal>| {
        if !values.is_empty() {
            and.push(RbacPrincipal::Or(values));
        }
        if !not_values.is_empty() {
            and.push(RbacPrincipal::Not(Box::new(RbacPrincipal::Or(not_values))));
        }
    };
    let principals = |values: &[String]| -> Vec<RbacPrincipal> {
        with_trust_domain_aliases(values, trust_domains)
            .iter()
            .map(|v| authenticated(spiffe_matcher(v)))
            .collect()
    };
    field(principals(&s.principals), principals(&s.not_principals));
    let accounts = |values: &[String]| -> Vec<RbacPrincipal> {
        values
            .iter()
            .map(|v| authenticated(service_account_matcher(namespace, v)))
            .collect()
    };
    field(
        accounts(&s.service_accounts),
        accounts(&s.not_service_accounts),
    );
    let namespaces = |values: &[String]| -> Vec<RbacPrincipal> {
        values
            .iter()
            .map(|v| authenticated(namespace_matcher(v)))
            .collect()
    };
    field(namespaces(&s.namespaces), namespaces(&s.not_namespaces));
    let addresses = |values: &[Cidr]| -> Vec<RbacPrincipal> {
        values
            .iter()
            .copied()
            .map(RbacPrincipal::RemoteIp)
            .collect()
    };
    field(
        addresses(&s.remote_ip_blocks),
        addresses(&s.not_remote_ip_blocks),
    );
    field(addresses(&s.ip_blocks), addresses(&s.not_ip_blocks));
    for c in when.iter().filter(|c| !c.key.on_destination()) {
        let each = |values: &[String]| -> Vec<RbacPrincipal> {
            match c.key {
                ConditionKey::SourcePrincipal => principals(values),
                ConditionKey::SourceNamespace => namespaces(values),
                ConditionKey::SourceServiceAccount => accounts(values),
                _ => values
                    .iter()
                    .filter_map(|v| parse_cidr(v).map(RbacPrincipal::RemoteIp))
                    .collect(),
            }
        };
        field(each(&c.values), each(&c.not_values));
    }
    if and.is_empty() {
        and.push(RbacPrincipal::Any);
    }
    RbacPrincipal::And(and)
}

fn authenticated(m: StringMatch) -> RbacPrincipal {
    RbacPrincipal::Authenticated(Some(m))
}

/// istiod's `StringMatcherWithPrefix(value, "spiffe://")`: `*` is any non-empty URI,
/// `*suffix` a regular expression, `prefix*` a prefix, anything else exact.
fn spiffe_matcher(value: &str) -> StringMatch {
    const URI: &str = "spiffe://";
    if value == "*" {
        return regex(".+");
    }
    if let Some(suffix) = value.strip_prefix('*') {
        return regex(&format!("{URI}.*{}", quote_meta(suffix)));
    }
    let kind = match value.strip_suffix('*') {
        Some(prefix) => StringMatchKind::Prefix(format!("{URI}{prefix}")),
        None => StringMatchKind::Exact(format!("{URI}{value}")),
    };
    StringMatch::new(kind, false)
}

/// istiod's `StringMatcher(value)`: as [`spiffe_matcher`] without the prefix.
fn plain_matcher(value: &str) -> StringMatch {
    if value == "*" {
        return regex(".+");
    }
    let kind = if let Some(suffix) = value.strip_prefix('*') {
        StringMatchKind::Suffix(suffix.to_string())
    } else if let Some(prefix) = value.strip_suffix('*') {
        StringMatchKind::Prefix(prefix.to_string())
    } else {
        StringMatchKind::Exact(value.to_string())
    };
    StringMatch::new(kind, false)
}

/// An address or CIDR range (`10.0.0.1`, `10.0.0.0/16`, IPv6 alike), as istiod's
/// `AddrStrToCidrRange` reads it.
pub fn parse_cidr(text: &str) -> Option<Cidr> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
    };
    Some(Cidr { addr, len })
}

/// istiod's namespace matcher: `.*/ns/<namespace>/.*`, each `*` of the value as `.*`.
fn namespace_matcher(value: &str) -> StringMatch {
    let ns: Vec<String> = value.split('*').map(quote_meta).collect();
    regex(&format!(".*/ns/{}/.*", ns.join(".*")))
}

/// istiod's `serviceAccountRegex`: `<namespace>/<name>` or `<name>` (in the policy's
/// namespace), as the `ns` and `sa` parts of a SPIFFE URI.
fn service_account_matcher(policy_namespace: &str, value: &str) -> StringMatch {
    let (ns, sa) = value.split_once('/').unwrap_or((policy_namespace, value));
    regex(&format!(
        "spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?",
        quote_meta(ns),
        quote_meta(sa)
    ))
}

fn regex(pattern: &str) -> StringMatch {
    // The pattern is built from quoted literals and `.*`/`.+`: always a valid regex.
    StringMatch::regex(pattern).expect("a pattern of quoted literals is a valid regex")
}

/// Go's `regexp.QuoteMeta`, so that the patterns read as istiod writes them.
fn quote_meta(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// istiod's `ReplaceTrustDomainAliases`: a principal `<td>/ns/<ns>/sa/<sa>` whose trust
/// domain is the mesh's, an alias, or `cluster.local` stands for the same identity in
/// every one of `trust_domains`; anything else (a `*` trust domain, another shape, a
/// foreign trust domain) is kept as written.
fn with_trust_domain_aliases(principals: &[String], trust_domains: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for principal in principals {
        let parts: Vec<&str> = principal.split('/').collect();
        let td = parts[0];
        let enforced = parts.len() == 5 && td != "*";
        if !enforced
            || !(td == "cluster.local" || trust_domains.iter().any(|t| domain_match(td, t)))
        {
            out.push(principal.clone());
            continue;
        }
        let mut mine: Vec<String> = Vec::new();
        for t in trust_domains {
            let replaced = if suffix_match(t, td) {
                principal.clone()
            } else {
                format!("{t}/{}", parts[1..].join("/"))
            };
            if !mine.contains(&replaced) {
                mine.push(replaced);
            }
        }
        out.extend(mine);
    }
    out
}

/// istiod's `stringMatch` of a trust domain against one of the list: equal, `*`, or a
/// prefix or suffix glob on either side.
fn domain_match(a: &str, s: &str) -> bool {
    a == s
        || s == "*"
        || prefix_match(a, s)
        || prefix_match(s, a)
        || suffix_match(a, s)
        || suffix_match(s, a)
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|p| a.ends_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::authz::{Denied, RbacConn, check_rbac};
    use std::net::SocketAddr;

    fn policy(name: &str, action: Action, src: Source, ports: Vec<u16>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: "istio-system".into(),
            name: name.into(),
            action,
            rules: vec![Rule {
                from: vec![src],
                to: if ports.is_empty() {
                    vec![]
                } else {
                    vec![Operation {
                        ports,
                        not_ports: vec![],
                    }]
                },
                when: vec![],
                unevaluable: false,
            }],
        }
    }

    fn principals(p: &[&str]) -> Source {
        Source {
            principals: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn check_from(
        policies: &[AuthorizationPolicy],
        id: Option<&str>,
        peer: &str,
        port: u16,
    ) -> Result<(), Denied> {
        let tds = vec!["cluster.local".to_string(), "old.local".to_string()];
        let filters = compile(policies, &tds);
        check_rbac(
            &filters,
            &RbacConn {
                principal: id,
                peer: peer.parse().unwrap(),
                local: SocketAddr::from(([10, 0, 1, 2], port)),
                sni: None,
            },
        )
    }

    fn check(policies: &[AuthorizationPolicy], id: &str, port: u16) -> Result<(), Denied> {
        check_from(policies, Some(id), "10.0.0.9:40000", port)
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/bar/sa/curl";

    #[test]
    fn no_policy_allows() {
        assert!(compile(&[], &[]).is_empty());
        assert!(check(&[], SLEEP, 15443).is_ok());
    }

    #[test]
    fn allow_matrix_with_wildcards() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["cluster.local/ns/foo/sa/sleep"], SLEEP, true),
            (&["cluster.local/ns/foo/sa/sleep"], OTHER, false),
            (&["cluster.local/ns/foo/*"], SLEEP, true),
            (&["cluster.local/ns/foo/*"], OTHER, false),
            (&["*/sa/curl"], OTHER, true),
            (&["*/sa/curl"], SLEEP, false),
            (&["*"], OTHER, true),
            // Written with the alias trust domain, still matches the mesh's own.
            (&["old.local/ns/foo/sa/sleep"], SLEEP, true),
        ];
        for (pats, id, want) in cases {
            let p = [policy("allow", Action::Allow, principals(pats), vec![])];
            assert_eq!(check(&p, id, 15443).is_ok(), *want, "{pats:?} vs {id}");
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = [
            policy("allow-all", Action::Allow, principals(&["*"]), vec![]),
            policy(
                "deny-bar",
                Action::Deny,
                Source {
                    namespaces: vec!["bar".into()],
                    ..Default::default()
                },
                vec![],
            ),
        ];
        assert!(check(&p, SLEEP, 15443).is_ok());
        assert_eq!(
            check(&p, OTHER, 15443).unwrap_err(),
            Denied::ByDenyPolicy("ns[istio-system]-policy[deny-bar]-rule[0]".into())
        );
    }

    #[test]
    fn not_principals_namespaces_and_ports() {
        let p = [policy(
            "allow-not-curl",
            Action::Allow,
            Source {
                namespaces: vec!["*".into()],
                not_principals: vec!["*/sa/curl".into()],
                ..Default::default()
            },
            vec![15443],
        )];
        assert!(check(&p, SLEEP, 15443).is_ok());
        assert!(check(&p, SLEEP, 15444).is_err(), "port not listed");
        assert_eq!(
            check(&p, OTHER, 15443).unwrap_err().reason(),
            "not_allowed_by_policy"
        );
        let ns = [policy(
            "allow-foo-ns",
            Action::Allow,
            Source {
                namespaces: vec!["fo*".into()],
                not_namespaces: vec!["food".into()],
                ..Default::default()
            },
            vec![],
        )];
        assert!(check(&ns, SLEEP, 1).is_ok());
        assert!(check(&ns, "spiffe://cluster.local/ns/food/sa/x", 1).is_err());
        assert!(check(&ns, OTHER, 1).is_err());
    }

    #[test]
    fn an_unauthenticated_peer_matches_no_principal_and_every_not_principal() {
        let deny_anonymous = [policy(
            "require-identity",
            Action::Deny,
            Source {
                not_principals: vec!["*".into()],
                ..Default::default()
            },
            vec![],
        )];
        assert!(check_from(&deny_anonymous, None, "10.0.0.9:1", 1).is_err());
        assert!(check(&deny_anonymous, SLEEP, 1).is_ok());
        let allow_foo = [policy("foo", Action::Allow, principals(&["*"]), vec![])];
        assert!(check_from(&allow_foo, None, "10.0.0.9:1", 1).is_err());
    }

    #[test]
    fn service_accounts_and_not_ports() {
        let mut p = policy(
            "accounts",
            Action::Allow,
            Source {
                service_accounts: vec!["foo/sleep".into(), "gateway".into()],
                ..Default::default()
            },
            vec![],
        );
        p.rules[0].to = vec![Operation {
            ports: vec![],
            not_ports: vec![15444],
        }];
        let p = [p];
        assert!(check(&p, SLEEP, 15443).is_ok());
        assert!(check(&p, SLEEP, 15444).is_err(), "a port in notPorts");
        assert!(check(&p, "spiffe://cluster.local/ns/foo/sa/sleeper", 15443).is_err());
        assert!(check(&p, "spiffe://cluster.local/ns/foo/x/sa/sleep/y", 15443).is_ok());
        // A bare name is in the policy's own namespace.
        assert!(check(&p, "spiffe://cluster.local/ns/istio-system/sa/gateway", 1).is_ok());
        assert!(check(&p, "spiffe://cluster.local/ns/foo/sa/gateway", 1).is_err());
    }

    #[test]
    fn when_conditions_on_the_peer_and_the_connection() {
        let cond = |key: &str, values: &[&str], not_values: &[&str]| Condition {
            key: ConditionKey::parse(key).unwrap(),
            values: values.iter().map(|s| s.to_string()).collect(),
            not_values: not_values.iter().map(|s| s.to_string()).collect(),
        };
        let mut p = policy("when", Action::Allow, Source::default(), vec![]);
        p.rules[0].when = vec![
            cond("source.ip", &["10.0.0.0/24"], &[]),
            cond("source.principal", &["cluster.local/ns/foo/sa/sleep"], &[]),
            cond("destination.port", &[], &["15444"]),
            cond("destination.ip", &["10.0.1.0/24"], &[]),
        ];
        let p = [p];
        assert!(check(&p, SLEEP, 15443).is_ok());
        assert!(
            check(&p, "spiffe://old.local/ns/foo/sa/sleep", 15443).is_ok(),
            "alias"
        );
        assert!(check(&p, SLEEP, 15444).is_err());
        assert!(check(&p, OTHER, 15443).is_err());
        assert!(check_from(&p, Some(SLEEP), "10.0.9.9:1", 15443).is_err());
        let mut sni = policy("sni", Action::Deny, Source::default(), vec![]);
        sni.rules[0].when = vec![cond("connection.sni", &["*.example"], &[])];
        let filters = compile(&[sni], &["cluster.local".into()]);
        let conn = |sni| RbacConn {
            principal: None,
            peer: "10.0.0.9:1".parse().unwrap(),
            local: "10.0.1.2:15445".parse().unwrap(),
            sni,
        };
        assert!(check_rbac(&filters, &conn(Some("echo.example"))).is_err());
        assert!(check_rbac(&filters, &conn(Some("echo.local"))).is_ok());
    }

    #[test]
    fn source_addresses() {
        let cidr = |s: &str| {
            let (a, l) = s.split_once('/').unwrap();
            Cidr {
                addr: a.parse().unwrap(),
                len: l.parse().unwrap(),
            }
        };
        let p = [policy(
            "from-hub",
            Action::Allow,
            Source {
                ip_blocks: vec![cidr("10.0.0.0/24")],
                not_remote_ip_blocks: vec![cidr("10.0.0.62/32")],
                ..Default::default()
            },
            vec![],
        )];
        assert!(check_from(&p, Some(SLEEP), "10.0.0.61:1", 1).is_ok());
        assert!(check_from(&p, Some(SLEEP), "10.0.0.62:1", 1).is_err());
        assert!(check_from(&p, Some(SLEEP), "10.0.1.61:1", 1).is_err());
        // An IPv4 peer on a dual-stack socket.
        assert!(check_from(&p, None, "[::ffff:10.0.0.61]:1", 1).is_ok());
    }

    #[test]
    fn rules_without_conditions_and_policies_without_rules() {
        let mut never = policy("never", Action::Allow, Source::default(), vec![]);
        never.rules.clear();
        assert!(check(&[never.clone()], SLEEP, 1).is_err());
        let mut always = never.clone();
        always.rules = vec![Rule::default()];
        assert!(check(&[always.clone()], SLEEP, 1).is_ok());
        // Together: one ALLOW filter, either policy may allow.
        assert!(check(&[never, always], SLEEP, 1).is_ok());
        // An ALLOW rule on what TCP cannot show never allows; it keeps its index.
        let mut http = policy("http", Action::Allow, principals(&["*"]), vec![]);
        http.rules.insert(
            0,
            Rule {
                unevaluable: true,
                ..Rule::default()
            },
        );
        let filters = compile(&[http.clone()], &["cluster.local".into()]);
        let names: Vec<&str> = filters[0]
            .policies
            .iter()
            .flatten()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["ns[istio-system]-policy[http]-rule[1]"]);
        assert!(check(&[http], SLEEP, 1).is_ok());
    }

    /// istiod's own cases (`trustdomain/bundle_test.go`, `TestReplaceTrustDomainAliases`).
    #[test]
    fn trust_domain_aliases_as_istiod_expands_them() {
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            (&["td1", "cluster.local"], &["*"], &["*"]),
            (
                &["td1", "cluster.local"],
                &["*/ns/foo/sa/bar"],
                &["*/ns/foo/sa/bar"],
            ),
            (
                &["td1", "cluster.local"],
                &["*/ns/foo/sa/bar", "*sa/zzz", "*"],
                &["*/ns/foo/sa/bar", "*sa/zzz", "*"],
            ),
            (
                &["td2", "td1", "cluster.local"],
                &["cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz"],
                &[
                    "td2/ns/foo/sa/bar",
                    "td1/ns/foo/sa/bar",
                    "cluster.local/ns/foo/sa/bar",
                    "td2/ns/yyy/sa/zzz",
                    "td1/ns/yyy/sa/zzz",
                    "cluster.local/ns/yyy/sa/zzz",
                ],
            ),
            (
                &["td2", "foo-td1", "cluster.local"],
                &["*-td1/ns/foo/sa/bar"],
                &[
                    "td2/ns/foo/sa/bar",
                    "*-td1/ns/foo/sa/bar",
                    "cluster.local/ns/foo/sa/bar",
                ],
            ),
            (
                &["td1", "td2"],
                &["some-td/ns/foo/sa/bar"],
                &["some-td/ns/foo/sa/bar"],
            ),
            (
                &["td1", "td2", "some-td"],
                &["some-td/ns/foo/sa/bar"],
                &[
                    "td1/ns/foo/sa/bar",
                    "td2/ns/foo/sa/bar",
                    "some-td/ns/foo/sa/bar",
                ],
            ),
            (
                &["new-td", "td2", "td3"],
                &["td1/ns/some-ns/sa/some-sa", "td2/ns/foo/sa/bar"],
                &[
                    "td1/ns/some-ns/sa/some-sa",
                    "new-td/ns/foo/sa/bar",
                    "td2/ns/foo/sa/bar",
                    "td3/ns/foo/sa/bar",
                ],
            ),
            (
                &["new-td", "td2", "td3"],
                &["/ns/some-ns/sa/some-sa"],
                &["/ns/some-ns/sa/some-sa"],
            ),
            (
                &["new-td", "old-td"],
                &["*-td/ns/some-ns/sa/some-sa"],
                &["*-td/ns/some-ns/sa/some-sa"],
            ),
            // cluster.local stands for the local trust domain even when not listed; a
            // principal with a wildcard elsewhere is not a five-part identity: as written.
            (
                &["example.org"],
                &["cluster.local/ns/a/sa/b"],
                &["example.org/ns/a/sa/b"],
            ),
            (&["td1", "td2"], &["td1/ns/foo/*"], &["td1/ns/foo/*"]),
        ];
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (tds, principals, want) in cases {
            assert_eq!(
                with_trust_domain_aliases(&owned(principals), &owned(tds)),
                owned(want),
                "{tds:?} {principals:?}"
            );
        }
    }

    #[test]
    fn matchers_read_as_istiod_writes_them() {
        let shown = |m: &StringMatch| match m.kind() {
            StringMatchKind::Exact(s) => format!("exact {s}"),
            StringMatchKind::Prefix(s) => format!("prefix {s}"),
            StringMatchKind::Regex(r) => format!("regex {}", r.as_str()),
            other => format!("{other:?}"),
        };
        assert_eq!(shown(&spiffe_matcher("*")), "regex ^(?:.+)$");
        assert_eq!(
            shown(&spiffe_matcher("*/sa/a.b")),
            r"regex ^(?:spiffe://.*/sa/a\.b)$"
        );
        assert_eq!(
            shown(&spiffe_matcher("td/ns/foo/*")),
            "prefix spiffe://td/ns/foo/"
        );
        assert_eq!(
            shown(&spiffe_matcher("td/ns/foo/sa/x")),
            "exact spiffe://td/ns/foo/sa/x"
        );
        assert_eq!(
            shown(&namespace_matcher("istio-sys*")),
            "regex ^(?:.*/ns/istio-sys.*/.*)$"
        );
    }
}
