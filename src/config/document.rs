//! The Kubernetes envelope of each document (`apiVersion`, `kind`, `metadata`, `spec`) and the
//! dispatch to the reader of each kind.

use super::diagnostics::{Loc, Sink};
use super::fields::{self, Fields, Path};
use super::istio::{
    self, AuthzDoc, DestinationRuleDoc, GatewayDoc, PeerAuthDoc, ServiceEntryDoc, WorkloadEntryDoc,
};
use super::strait::{self, BootstrapDoc, BridgeDoc};
use super::yaml::{Node, Value};

// The kind readers import `Meta` back from this envelope: simpler than a module for one struct.
/// Name, namespace and position (of `kind`) of one document.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub name: String,
    pub namespace: String,
    pub loc: Loc,
}

impl Meta {
    /// `namespace/name`, as Istio names resources in logs.
    pub fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Every document read, by kind, in file order.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub bootstrap: Option<BootstrapDoc>,
    pub gateways: Vec<GatewayDoc>,
    pub service_entries: Vec<ServiceEntryDoc>,
    pub workload_entries: Vec<WorkloadEntryDoc>,
    pub destination_rules: Vec<DestinationRuleDoc>,
    pub peer_authentications: Vec<PeerAuthDoc>,
    pub authorization_policies: Vec<AuthzDoc>,
    pub bridges: Vec<BridgeDoc>,
    pub virtual_services: Vec<super::virtual_service::VirtualServiceDoc>,
}

const NETWORKING: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
const SECURITY: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
const STRAIT: &str = "strait.dev/v1alpha1";
const GATEWAY_API: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// How the Gateway API `Gateway` is named where fields are listed (`docs/fields.md`), apart
/// from Istio's own `Gateway`.
pub(crate) const GATEWAY_API_KIND: &str = "Gateway (gateway.networking.k8s.io)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gateway,
    /// Gateway API's `Gateway` (class `istio-east-west`: ambient's HBONE listener).
    GatewayApi,
    ServiceEntry,
    WorkloadEntry,
    DestinationRule,
    PeerAuthentication,
    AuthorizationPolicy,
    VirtualService,
    Bootstrap,
    Bridge,
    /// Kubernetes' `v1` `List`, as `kubectl get -o yaml` prints it.
    List,
}

fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    let networking = NETWORKING.contains(&api_version);
    let security = SECURITY.contains(&api_version);
    Some(match kind {
        "Gateway" if networking => Kind::Gateway,
        "Gateway" if GATEWAY_API.contains(&api_version) => Kind::GatewayApi,
        "ServiceEntry" if networking => Kind::ServiceEntry,
        "WorkloadEntry" if networking => Kind::WorkloadEntry,
        "DestinationRule" if networking => Kind::DestinationRule,
        "VirtualService" if networking => Kind::VirtualService,
        "PeerAuthentication" if security => Kind::PeerAuthentication,
        "AuthorizationPolicy" if security => Kind::AuthorizationPolicy,
        "Bootstrap" if api_version == STRAIT => Kind::Bootstrap,
        "Bridge" if api_version == STRAIT => Kind::Bridge,
        "List" if api_version == "v1" => Kind::List,
        _ => return None,
    })
}

/// Reads one document into `out`, recording problems in `sink`.
pub(crate) fn read_document(sink: &mut Sink, node: &Node, out: &mut Parsed) {
    // Empty documents (`---` followed by nothing, or only comments) are fine.
    if matches!(node.value, Value::Null | Value::Bad) {
        return;
    }
    fields::record_kind("*");
    let Some(mut doc) = Fields::of(sink, node, Path::root("document")) else {
        return;
    };
    let api_version = doc
        .get("apiVersion")
        .and_then(|n| fields::string(sink, n, &Path::root("apiVersion")));
    let kind_entry = doc.get_entry("kind");
    let kind_name = kind_entry.and_then(|(_, n)| fields::string(sink, n, &Path::root("kind")));
    let (Some(api_version), Some(kind_name), Some((_, kind_node))) =
        (api_version, kind_name, kind_entry)
    else {
        sink.error(
            node.loc,
            "document has no apiVersion and kind; every document needs both, e.g. \
             apiVersion: networking.istio.io/v1 and kind: ServiceEntry",
        );
        return;
    };
    let Some(kind) = kind_of(&api_version, &kind_name) else {
        sink.warn(
            kind_node.loc,
            format!("kind {kind_name} ({api_version}) is not used by strait; ignored"),
        );
        return;
    };
    fields::record_kind(if kind == Kind::GatewayApi {
        GATEWAY_API_KIND
    } else {
        &kind_name
    });
    if kind == Kind::List {
        if let Some(items) = doc.get("items") {
            for item in fields::seq(sink, items, &Path::root("items")) {
                read_document(sink, item, out);
            }
        }
        doc.accept(&["metadata"]);
        doc.finish(sink);
        return;
    }

    let meta = read_meta(sink, &mut doc, kind, kind_node.loc);
    // `status` appears in `kubectl get -o yaml` output; it is the cluster's, not the user's.
    doc.accept(&["status"]);
    let spec_path = Path::root("spec");
    let empty = Node {
        loc: node.loc,
        value: Value::Null,
    };
    let spec_node = doc.get("spec").unwrap_or(&empty);
    doc.finish(sink);
    let Some(meta) = meta else { return };
    let Some(spec) = Fields::of(sink, spec_node, spec_path) else {
        return;
    };
    match kind {
        Kind::Gateway => {
            if let Some(d) = istio::gateway(sink, meta, spec) {
                out.gateways.push(d);
            }
        }
        Kind::GatewayApi => {
            if let Some(d) = super::gateway_api::gateway(sink, meta, spec) {
                out.gateways.push(d);
            }
        }
        Kind::ServiceEntry => {
            if let Some(d) = istio::service_entry(sink, meta, spec) {
                out.service_entries.push(d);
            }
        }
        Kind::WorkloadEntry => {
            if let Some(d) = istio::workload_entry(sink, meta, spec) {
                out.workload_entries.push(d);
            }
        }
        Kind::DestinationRule => {
            if let Some(d) = istio::destination_rule(sink, meta, spec) {
                out.destination_rules.push(d);
            }
        }
        Kind::VirtualService => {
            if let Some(d) = super::virtual_service::read(sink, meta, spec) {
                out.virtual_services.push(d);
            }
        }
        Kind::PeerAuthentication => {
            if let Some(d) = istio::peer_authentication(sink, meta, spec) {
                out.peer_authentications.push(d);
            }
        }
        Kind::AuthorizationPolicy => {
            if let Some(d) = istio::authorization_policy(sink, meta, spec) {
                out.authorization_policies.push(d);
            }
        }
        Kind::Bootstrap => {
            if let Some(first) = &out.bootstrap {
                sink.error(
                    meta.loc,
                    format!(
                        "a second Bootstrap document; only one is allowed (the first is {}); \
                         merge them into one",
                        first.meta.name
                    ),
                );
                return;
            }
            out.bootstrap = strait::bootstrap(sink, meta, spec);
        }
        Kind::Bridge => {
            if let Some(d) = strait::bridge(sink, meta, spec) {
                out.bridges.push(d);
            }
        }
        Kind::List => {}
    }
}

fn read_meta(sink: &mut Sink, doc: &mut Fields<'_, '_>, kind: Kind, loc: Loc) -> Option<Meta> {
    let path = Path::root("metadata");
    let mut name = None;
    let mut namespace = "default".to_string();
    let meta_fields = doc.get("metadata").and_then(|m| Fields::of(sink, m, path));
    if let Some(mut f) = meta_fields {
        if let Some(n) = f.get("name") {
            name = fields::string(sink, n, &path.key("name"));
        }
        if let Some(ns) = f
            .get("namespace")
            .and_then(|n| fields::string(sink, n, &path.key("namespace")))
        {
            namespace = ns;
        }
        // The rest of the object metadata is the cluster's bookkeeping.
        f.accept(&[
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "generateName",
            "ownerReferences",
            "finalizers",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ]);
        f.finish(sink);
    }
    let name = match name {
        Some(n) if !n.is_empty() => n,
        _ if kind == Kind::Bootstrap => "bootstrap".to_string(),
        _ => {
            sink.error(loc, "metadata.name is required");
            return None;
        }
    };
    Some(Meta {
        name,
        namespace,
        loc,
    })
}
