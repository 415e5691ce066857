//! The one policy evaluator: a server's network RBAC filters (from istiod, or compiled
//! from files by [`super::compile`]) judged against a connection, as Envoy's
//! `envoy.filters.network.rbac` judges it. With istiod's order of filters this is Istio's
//! rule: any matching DENY policy denies; otherwise, if any ALLOW policy exists, one must
//! match; with no ALLOW policy, the connection is allowed.

use std::net::SocketAddr;

use crate::model::{RbacAction, RbacFilter, RbacPermission, RbacPrincipal};

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
