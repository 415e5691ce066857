//! AuthorizationPolicy evaluation for ISTIO_MUTUAL connections, in Istio's order:
//! any matching DENY policy denies; otherwise, if any ALLOW policy exists, one must match;
//! with no ALLOW policy, the connection is allowed.

use std::net::SocketAddr;

use crate::model::{
    AuthzAction, AuthzPolicy, AuthzRule, AuthzSource, RbacAction, RbacFilter, RbacPermission,
    RbacPrincipal,
};
use crate::tls::spiffe::SpiffeId;

/// Why a connection was denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("denied by DENY policy {0}")]
    ByDenyPolicy(String),
    #[error("no ALLOW policy matches (policies: {0})")]
    NotAllowed(String),
}

impl Denied {
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::ByDenyPolicy(_) => "denied_by_policy",
            Denied::NotAllowed(_) => "not_allowed_by_policy",
        }
    }
}

/// The peer as policy sees it.
pub struct Peer<'a> {
    /// `None` for a client without a certificate (PeerAuthentication PERMISSIVE).
    pub id: Option<&'a SpiffeId>,
    /// The mesh trust domain and its aliases: a principal written with any of them
    /// matches a peer from any of them, as in Istio.
    pub trust_domains: &'a [String],
    /// The port the connection arrived on.
    pub port: u16,
}

pub fn authorize(policies: &[AuthzPolicy], peer: &Peer<'_>) -> Result<(), Denied> {
    for p in policies.iter().filter(|p| p.action == AuthzAction::Deny) {
        if p.rules.iter().any(|r| rule_matches(r, peer)) {
            return Err(Denied::ByDenyPolicy(p.name.clone()));
        }
    }
    let allows: Vec<&AuthzPolicy> = policies
        .iter()
        .filter(|p| p.action == AuthzAction::Allow)
        .collect();
    if allows.is_empty()
        || allows
            .iter()
            .any(|p| p.rules.iter().any(|r| rule_matches(r, peer)))
    {
        Ok(())
    } else {
        Err(Denied::NotAllowed(
            allows
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }
}

/// A connection as Envoy's network RBAC filter judges it.
pub struct RbacConn<'a> {
    /// The verified peer certificate's SPIFFE ID (its URI SAN); `None` when the gateway
    /// did not terminate the client's TLS or the client sent no certificate.
    pub principal: Option<&'a str>,
    pub peer: SocketAddr,
    /// The gateway's own address of the connection: destination IP and port.
    pub local: SocketAddr,
    pub sni: Option<&'a str>,
}

/// Applies a server's RBAC filters in order, as Envoy runs them: an ALLOW filter refuses a
/// connection no policy matches, a DENY filter one that a policy matches, a LOG filter
/// nothing; a filter without rules lets everything through.
pub fn check_rbac(filters: &[RbacFilter], conn: &RbacConn<'_>) -> Result<(), Denied> {
    for f in filters {
        let Some(policies) = &f.policies else {
            continue;
        };
        let matched = policies.iter().find(|p| {
            p.permissions.iter().any(|x| permission_matches(x, conn))
                && p.principals.iter().any(|x| principal_matches_rbac(x, conn))
        });
        match (f.action, matched) {
            (RbacAction::Deny, Some(p)) => return Err(Denied::ByDenyPolicy(p.name.clone())),
            (RbacAction::Allow, None) => return Err(Denied::NotAllowed(f.name.clone())),
            _ => {}
        }
    }
    Ok(())
}

fn permission_matches(p: &RbacPermission, c: &RbacConn<'_>) -> bool {
    match p {
        RbacPermission::Any => true,
        RbacPermission::And(all) => all.iter().all(|x| permission_matches(x, c)),
        RbacPermission::Or(any) => any.iter().any(|x| permission_matches(x, c)),
        RbacPermission::Not(x) => !permission_matches(x, c),
        RbacPermission::DestinationPort(port) => c.local.port() == *port,
        RbacPermission::DestinationPortRange(start, end) => {
            (*start..*end).contains(&u32::from(c.local.port()))
        }
        RbacPermission::DestinationIp(net) => net.contains(c.local.ip()),
        RbacPermission::ServerName(m) => m.matches(c.sni.unwrap_or("")),
    }
}

fn principal_matches_rbac(p: &RbacPrincipal, c: &RbacConn<'_>) -> bool {
    match p {
        RbacPrincipal::Any => true,
        RbacPrincipal::And(all) => all.iter().all(|x| principal_matches_rbac(x, c)),
        RbacPrincipal::Or(any) => any.iter().any(|x| principal_matches_rbac(x, c)),
        RbacPrincipal::Not(x) => !principal_matches_rbac(x, c),
        RbacPrincipal::Authenticated(name) => match (c.principal, name) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(id), Some(m)) => m.matches(id),
        },
        RbacPrincipal::RemoteIp(net) => net.contains(c.peer.ip()),
    }
}

fn rule_matches(rule: &AuthzRule, peer: &Peer<'_>) -> bool {
    let from_ok = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer));
    let port_ok = rule.ports.is_empty() || rule.ports.contains(&peer.port);
    from_ok && port_ok
}

fn source_matches(s: &AuthzSource, peer: &Peer<'_>) -> bool {
    let principal_ok = |patterns: &[String]| patterns.iter().any(|p| principal_matches(p, peer));
    let ns = peer.id.and_then(SpiffeId::namespace).unwrap_or("");
    let ns_ok = |patterns: &[String]| patterns.iter().any(|p| wildcard(p, ns));
    (s.principals.is_empty() || principal_ok(&s.principals))
        && !principal_ok(&s.not_principals)
        && (s.namespaces.is_empty() || ns_ok(&s.namespaces))
        && !ns_ok(&s.not_namespaces)
}

/// `td/ns/x/sa/y` patterns with `*` prefix/suffix wildcards; the trust domain part
/// matches across the mesh domain and its aliases.
fn principal_matches(pattern: &str, peer: &Peer<'_>) -> bool {
    // An unauthenticated peer has no principal: it matches no pattern (so
    // `notPrincipals: ["*"]` selects exactly the unauthenticated, as in Istio).
    let Some(id) = peer.id else {
        return false;
    };
    let principal = id.principal();
    if wildcard(pattern, &principal) {
        return true;
    }
    let td = id.trust_domain();
    if !peer.trust_domains.iter().any(|t| t == td) {
        return false;
    }
    let rest = &principal[td.len()..];
    peer.trust_domains
        .iter()
        .filter(|t| t.as_str() != td)
        .any(|t| wildcard(pattern, &format!("{t}{rest}")))
}

/// Istio's string match: exact, `*`, `prefix*`, or `*suffix`.
fn wildcard(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, action: AuthzAction, src: AuthzSource, ports: Vec<u16>) -> AuthzPolicy {
        AuthzPolicy {
            name: name.into(),
            action,
            rules: vec![AuthzRule {
                from: vec![src],
                ports,
            }],
        }
    }

    fn principals(p: &[&str]) -> AuthzSource {
        AuthzSource {
            principals: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn check(policies: &[AuthzPolicy], id: &str, port: u16) -> Result<(), Denied> {
        let id = SpiffeId::parse(id).unwrap();
        let tds = vec!["cluster.local".to_string(), "old.local".to_string()];
        authorize(
            policies,
            &Peer {
                id: Some(&id),
                trust_domains: &tds,
                port,
            },
        )
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/bar/sa/curl";

    #[test]
    fn no_policy_allows() {
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
            let p = [policy(
                "allow",
                AuthzAction::Allow,
                principals(pats),
                vec![],
            )];
            assert_eq!(check(&p, id, 15443).is_ok(), *want, "{pats:?} vs {id}");
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = [
            policy("allow-all", AuthzAction::Allow, principals(&["*"]), vec![]),
            policy(
                "deny-bar",
                AuthzAction::Deny,
                AuthzSource {
                    namespaces: vec!["bar".into()],
                    ..Default::default()
                },
                vec![],
            ),
        ];
        assert!(check(&p, SLEEP, 15443).is_ok());
        assert_eq!(
            check(&p, OTHER, 15443).unwrap_err(),
            Denied::ByDenyPolicy("deny-bar".into())
        );
    }

    #[test]
    fn not_principals_namespaces_and_ports() {
        let p = [policy(
            "allow-not-curl",
            AuthzAction::Allow,
            AuthzSource {
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
            AuthzAction::Allow,
            AuthzSource {
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
}
