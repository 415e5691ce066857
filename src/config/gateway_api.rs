//! The Gateway API `Gateway` (`gateway.networking.k8s.io`) of Istio's ambient east-west
//! gateway: class `istio-east-west`, a listener with protocol `HBONE` (port 15008) whose TLS
//! is terminated with Istio's mutual TLS. It becomes an HBONE server; the services it
//! reaches are the ServiceEntries', as for every other server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::model::{HostMatch, ServerTlsMode};

use super::diagnostics::Sink;
use super::document::Meta;
use super::fields::{self, Fields, Path};
use super::istio::{GatewayDoc, ServerDoc};
use super::yaml::Node;

/// The class Istio gives its ambient east-west gateway.
pub(crate) const EAST_WEST_CLASS: &str = "istio-east-west";

/// The TLS option that makes a `Terminate` listener use Istio's mutual TLS (the gateway's
/// SVID, a client certificate from the mesh) instead of `certificateRefs`.
const TERMINATE_MODE: &str = "gateway.istio.io/tls-terminate-mode";

pub(crate) fn gateway(sink: &mut Sink, meta: Meta, mut spec: Fields<'_, '_>) -> Option<GatewayDoc> {
    let root = *spec.path();
    let class = spec
        .get("gatewayClassName")
        .and_then(|n| fields::string(sink, n, &root.key("gatewayClassName")).map(|c| (c, n.loc)));
    // Where the Gateway's pods run and how its Service looks are the cluster's business.
    spec.accept(&["infrastructure"]);
    spec.not_used(sink, &["addresses", "backendTLS", "allowedListeners"]);
    let served = match &class {
        Some((c, _)) if c == EAST_WEST_CLASS => true,
        Some((c, loc)) => {
            sink.warn(
                *loc,
                format!(
                    "gatewayClassName {c} is not served by strait (only {EAST_WEST_CLASS}); Gateway {} skipped",
                    meta.qualified()
                ),
            );
            false
        }
        None => {
            sink.error(
                meta.loc,
                format!(
                    "Gateway {} has no spec.gatewayClassName; strait serves {EAST_WEST_CLASS}",
                    meta.qualified()
                ),
            );
            false
        }
    };
    let mut servers = Vec::new();
    if !served {
        // Another controller's Gateway: its listeners are not strait's to judge.
        spec.accept(&["listeners"]);
    }
    match spec.get("listeners").filter(|_| served) {
        Some(list) => {
            let p = root.key("listeners");
            for (i, item) in fields::seq(sink, list, &p).iter().enumerate() {
                if let Some(s) = listener(sink, &meta, i, item, &p.index(i)) {
                    servers.push(s);
                }
            }
        }
        None if !served => {}
        None => sink.error(
            meta.loc,
            "Gateway has no spec.listeners; add a listener with protocol HBONE on port 15008",
        ),
    }
    spec.finish(sink);
    Some(GatewayDoc {
        name: meta.name,
        namespace: meta.namespace,
        servers,
    })
}

fn listener(
    sink: &mut Sink,
    meta: &Meta,
    index: usize,
    node: &Node,
    path: &Path<'_>,
) -> Option<ServerDoc> {
    let mut f = Fields::of(sink, node, *path)?;
    let name = f
        .get("name")
        .and_then(|n| fields::string(sink, n, &path.key("name")));
    let port = match f.get("port") {
        Some(n) => fields::port(sink, n, &path.key("port")),
        None => {
            sink.error(node.loc, format!("{path}.port is required"));
            None
        }
    };
    let mut skipped = false;
    let mut mode_loc = node.loc;
    match f.get("protocol") {
        Some(n) => {
            mode_loc = n.loc;
            match fields::string(sink, n, &path.key("protocol")) {
                Some(p) if p == "HBONE" => {}
                Some(p) => {
                    skipped = true;
                    sink.warn(
                        n.loc,
                        format!(
                            "{path}.protocol {p} is not served by strait on a Gateway API Gateway (only HBONE); listener skipped"
                        ),
                    );
                }
                None => skipped = true,
            }
        }
        None => {
            skipped = true;
            sink.error(node.loc, format!("{path}.protocol is required"));
        }
    }
    match f.get("tls") {
        // A listener already skipped for its protocol needs no second word on its TLS.
        Some(_) if skipped => {}
        Some(tls) => skipped |= !terminates_istio_mutual(sink, tls, &path.key("tls")),
        None if skipped => {}
        None => {
            skipped = true;
            sink.warn(
                node.loc,
                format!(
                    "{path} has no tls; an HBONE listener needs tls.mode Terminate with options {{{TERMINATE_MODE}: ISTIO_MUTUAL}}; listener skipped"
                ),
            );
        }
    }
    f.not_used(sink, &["hostname", "allowedRoutes"]);
    f.finish(sink);
    if skipped {
        return None;
    }
    let label = name.unwrap_or_else(|| index.to_string());
    Some(ServerDoc {
        name: format!("{}/{}/{label}", meta.namespace, meta.name),
        // Istio's ambient gateway listens on every address (`0.0.0.0:15008`).
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port?),
        mode: ServerTlsMode::Hbone,
        // Every service port a ServiceEntry declares may be named by an `:authority`.
        hosts: vec![HostMatch::Any],
        host_namespaces: vec![None],
        mode_loc,
    })
}

/// Whether a listener's `tls` asks for what an ambient gateway does: `mode: Terminate`
/// with Istio's mutual TLS. Anything else is warned about (the listener is then skipped).
fn terminates_istio_mutual(sink: &mut Sink, node: &Node, path: &Path<'_>) -> bool {
    let Some(mut tf) = Fields::of(sink, node, *path) else {
        return false;
    };
    let mut ok = true;
    // Absent, Gateway API's default: Terminate.
    if let Some(m) = tf.get("mode") {
        match fields::string(sink, m, &path.key("mode")) {
            Some(mode) if mode == "Terminate" => {}
            Some(mode) => {
                ok = false;
                sink.warn(
                    m.loc,
                    format!(
                        "{path}.mode {mode} is not served by strait on an HBONE listener (only Terminate); listener skipped"
                    ),
                );
            }
            None => ok = false,
        }
    }
    let options = path.key("options");
    let mut mutual = false;
    let mut named = false;
    if let Some(o) = tf.get("options")
        && let Some(mut of) = Fields::of(sink, o, options)
    {
        if let Some(v) = of.get(TERMINATE_MODE) {
            named = true;
            match fields::string(sink, v, &options.key(TERMINATE_MODE)) {
                Some(m) if m == "ISTIO_MUTUAL" => mutual = true,
                Some(m) => sink.warn(
                    v.loc,
                    format!(
                        "{options}.{TERMINATE_MODE} {m} is not served by strait on an HBONE listener (only ISTIO_MUTUAL); listener skipped"
                    ),
                ),
                None => {}
            }
        }
        of.finish(sink);
    }
    if !mutual {
        // Said once: a wrong mode or value was already named above.
        if ok && !named {
            sink.warn(
                node.loc,
                format!(
                    "{path} has no options {{{TERMINATE_MODE}: ISTIO_MUTUAL}}; strait terminates HBONE only with Istio's mutual TLS; listener skipped"
                ),
            );
        }
    }
    tf.not_used(sink, &["certificateRefs", "frontendValidation"]);
    tf.finish(sink);
    ok && mutual
}
