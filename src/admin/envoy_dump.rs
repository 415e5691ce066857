//! The configuration in force in Envoy's admin shapes, so that the operator's tools read
//! strait as they read Envoy: `/config_dump`'s `configs` (`ListenersConfigDump`,
//! `ClustersConfigDump`, `EndpointsConfigDump` with `?include_eds`, `SecretsConfigDump`)
//! and `/clusters?format=json`'s `cluster_statuses`, which `istioctl proxy-config
//! listener|cluster|endpoint|secret --file` print.
//!
//! From istiod, the resources are the ones strait accepted, byte for byte as istiod sent
//! them. From files, they are what istiod would send for the same YAML
//! ([`super::envoy_files`]). The secrets are the gateway's own SVID and mesh roots, its
//! private key redacted as Envoy redacts it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LbEndpoint};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use prost::Message;
use serde_json::{Value as Json, json};

use super::proto_json::{any, of, rfc3339};
use crate::proxy::Shared;
use crate::route::sni::parse_subset_key;
use crate::xds::translate::{CLUSTER, ENDPOINTS, LISTENER};

const ADMIN: &str = "type.googleapis.com/envoy.admin.v3.";

/// One resource of a dump: its name, version, encoding and when it was taken.
pub struct Resource {
    pub name: String,
    pub version: String,
    pub value: Vec<u8>,
    pub at: SystemTime,
}

/// Listeners, clusters and endpoints, from istiod or from files.
#[derive(Default)]
pub struct Resources {
    pub version: BTreeMap<&'static str, String>,
    pub by_type: BTreeMap<&'static str, Vec<Resource>>,
}

impl Resources {
    fn of(&self, type_url: &str) -> &[Resource] {
        self.by_type.get(type_url).map_or(&[], Vec::as_slice)
    }

    fn version(&self, type_url: &str) -> &str {
        self.version.get(type_url).map_or("", String::as_str)
    }
}

/// The resources in force: accepted from istiod when discovery is on (both streams with
/// `discovery.waypoint`), else built from the file snapshot.
pub fn resources(shared: &Shared) -> Resources {
    let mut out = Resources::default();
    let Some(status) = shared.discovery.get() else {
        let at = SystemTime::now();
        for (url, held) in super::envoy_files::resources(&shared.runtime.load().snapshot) {
            out.version.insert(url, "files".into());
            let held = held.into_iter().map(|(name, value)| Resource {
                name,
                version: "files".into(),
                value,
                at,
            });
            out.by_type.insert(url, held.collect());
        }
        return out;
    };
    {
        let inner = status.lock();
        for (short, url) in crate::xds::TYPES {
            if let Some(t) = inner.types.get(short) {
                out.version.insert(url, t.version.clone());
            }
        }
    }
    // The waypoint stream's resources beside the router's, as one proxy serving both;
    // where both streams hold a resource of one name (`BlackHoleCluster`), the router's.
    let waypoint = shared.waypoint_discovery.get();
    for status in std::iter::once(status).chain(waypoint) {
        for (url, held) in status.accepted().iter() {
            let list = out.by_type.entry(url).or_default();
            let taken: std::collections::BTreeSet<String> =
                list.iter().map(|r| r.name.clone()).collect();
            list.extend(
                held.iter()
                    .filter(|(name, _)| !taken.contains(*name))
                    .map(|(name, a)| Resource {
                        name: name.clone(),
                        version: a.version.clone(),
                        value: a.value.clone(),
                        at: a.at,
                    }),
            );
        }
    }
    out
}

/// `/config_dump`'s `configs`, in Envoy's order.
pub fn configs(shared: &Shared, include_eds: bool) -> Vec<Json> {
    let r = resources(shared);
    let mut configs = vec![
        json!({
            "@type": format!("{ADMIN}ClustersConfigDump"),
            "version_info": r.version(CLUSTER),
            "dynamic_active_clusters": r.of(CLUSTER).iter().map(|c| json!({
                "version_info": c.version,
                "cluster": any(CLUSTER, &c.value),
                "last_updated": rfc3339(c.at.into()),
            })).collect::<Vec<_>>(),
        }),
        json!({
            "@type": format!("{ADMIN}ListenersConfigDump"),
            "version_info": r.version(LISTENER),
            "dynamic_listeners": r.of(LISTENER).iter().map(|l| json!({
                "name": l.name,
                "active_state": {
                    "version_info": l.version,
                    "listener": any(LISTENER, &l.value),
                    "last_updated": rfc3339(l.at.into()),
                },
            })).collect::<Vec<_>>(),
        }),
    ];
    if include_eds {
        configs.push(json!({
            "@type": format!("{ADMIN}EndpointsConfigDump"),
            "dynamic_endpoint_configs": r.of(ENDPOINTS).iter().map(|e| json!({
                "version_info": e.version,
                "endpoint_config": any(ENDPOINTS, &e.value),
                "last_updated": rfc3339(e.at.into()),
            })).collect::<Vec<_>>(),
        }));
    }
    configs.push(secrets(shared));
    configs
}

/// The gateway's SVID (`default`) and mesh roots (`ROOTCA`), as pilot-agent's SDS hands
/// them to Envoy; the private key shows as Envoy shows any sensitive field.
fn secrets(shared: &Shared) -> Json {
    let material = shared.tls.load();
    let Some(m) = material.as_ref() else {
        return json!({"@type": format!("{ADMIN}SecretsConfigDump")});
    };
    let pem = |certs: &[rustls::pki_types::CertificateDer<'static>]| {
        certs
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect::<String>()
            .into_bytes()
    };
    let inline = |bytes: Vec<u8>| core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    };
    let default = tls::Secret {
        name: "default".into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(pem(&m.chain))),
            private_key: Some(inline(b"[redacted]".to_vec())),
            ..Default::default()
        })),
    };
    let root = tls::Secret {
        name: "ROOTCA".into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: Some(inline(pem(&m.roots))),
                ..Default::default()
            },
        )),
    };
    let at = rfc3339(m.built.into());
    let active: Vec<Json> = [default, root]
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "version_info": at,
                "last_updated": at,
                "secret": of(s),
            })
        })
        .collect();
    json!({
        "@type": format!("{ADMIN}SecretsConfigDump"),
        "dynamic_active_secrets": active,
    })
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// `/clusters?format=json`'s `cluster_statuses`: every cluster in force with the hosts
/// its endpoints name, their EDS health, and whether outlier detection ejected them.
pub fn cluster_statuses(shared: &Shared) -> Vec<Json> {
    let r = resources(shared);
    let assignments: BTreeMap<String, ClusterLoadAssignment> = r
        .of(ENDPOINTS)
        .iter()
        .filter_map(|e| ClusterLoadAssignment::decode(e.value.as_slice()).ok())
        .map(|a| (a.cluster_name.clone(), a))
        .collect();
    let runtime = shared.runtime.load();
    let mut out = Vec::new();
    for c in r.of(CLUSTER) {
        let Ok(cluster) =
            envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(c.value.as_slice())
        else {
            continue;
        };
        let eds_name = cluster
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| cluster.name.clone());
        let assignment = cluster
            .load_assignment
            .as_ref()
            .or_else(|| assignments.get(&eds_name));
        // Ejection state lives with the served cluster of the same service and subset.
        let served = served_cluster(&runtime, &cluster.name);
        let mut hosts = Vec::new();
        for l in assignment.into_iter().flat_map(|a| &a.endpoints) {
            for e in &l.lb_endpoints {
                let Some(address) = lb_address(e) else {
                    continue;
                };
                let member = served.as_ref().and_then(|c| member(c, &address));
                let ejected = served
                    .as_ref()
                    .zip(member.as_ref())
                    .is_some_and(|(c, m)| c.is_ejected(m));
                let health = core::HealthStatus::try_from(e.health_status)
                    .unwrap_or(core::HealthStatus::Unknown);
                // Envoy reports an endpoint EDS left UNKNOWN as HEALTHY.
                let eds_health = match health {
                    core::HealthStatus::Unknown => core::HealthStatus::Healthy,
                    h => h,
                };
                let host = |address: Json| {
                    json!({
                        "address": address,
                        "health_status": {
                            "eds_health_status": eds_health.as_str_name(),
                            "failed_outlier_check": ejected,
                        },
                        "weight": e.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                        "locality": l.locality.as_ref().map(|l| json!({
                            "region": l.region, "zone": l.zone, "sub_zone": l.sub_zone,
                        })),
                    })
                };
                // A DNS cluster's hosts are the addresses its names resolved to, as
                // Envoy lists a strict DNS cluster's.
                let resolved = member.map(|m| m.state.resolved()).unwrap_or_default();
                if resolved.is_empty() {
                    hosts.push(host(address.json));
                } else {
                    hosts.extend(resolved.iter().map(|a| {
                        host(json!({"socket_address": {
                            "address": a.ip().to_string(), "port_value": a.port(),
                        }}))
                    }));
                }
            }
        }
        out.push(json!({
            "name": cluster.name,
            "added_via_api": true,
            "eds_service_name": cluster.eds_cluster_config.as_ref().map(|_| eds_name.clone()),
            "host_statuses": hosts,
        }));
    }
    out
}

/// A host's address as Envoy's admin writes it, and as `ip:port` for lookups.
struct HostAddress {
    json: Json,
    authority: Option<String>,
}

fn lb_address(e: &LbEndpoint) -> Option<HostAddress> {
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
        return None;
    };
    match ep.address.as_ref()?.address.as_ref()? {
        core::address::Address::SocketAddress(s) => {
            let port = match s.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            Some(HostAddress {
                json: json!({"socket_address": {"address": s.address, "port_value": port}}),
                authority: Some(format!("{}:{port}", s.address)),
            })
        }
        core::address::Address::EnvoyInternalAddress(i) => {
            let listener = match &i.address_name_specifier {
                Some(core::envoy_internal_address::AddressNameSpecifier::ServerListenerName(n)) => {
                    n.clone()
                }
                None => String::new(),
            };
            Some(HostAddress {
                json: json!({"envoy_internal_address": {
                    "server_listener_name": listener, "endpoint_id": i.endpoint_id,
                }}),
                // istiod's HBONE endpoints carry `<pod IP>:<target port>` here: the
                // served endpoint's own authority.
                authority: Some(i.endpoint_id.clone()),
            })
        }
        core::address::Address::Pipe(p) => Some(HostAddress {
            json: json!({"pipe": {"path": p.path}}),
            authority: None,
        }),
    }
}

/// The served cluster behind an Istio cluster name: `outbound_.<port>_.<subset>_.<host>`
/// (the SNI-DNAT form), `outbound|<port>|<subset>|<host>`, or the ambient east-west
/// gateway's `inbound-vip|<port>|tcp|<host>` (the tunnels' cluster).
fn served_cluster(
    runtime: &crate::proxy::Runtime,
    name: &str,
) -> Option<std::sync::Arc<crate::upstream::Cluster>> {
    let (host, port, subset) = if let Ok(key) = parse_subset_key(name) {
        (
            key.host.to_string(),
            key.port,
            key.subset.map(str::to_string),
        )
    } else {
        let mut parts = name.splitn(4, '|');
        let (_, port, subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        (
            host.to_string(),
            port.parse().ok()?,
            (!subset.is_empty()).then(|| subset.to_string()),
        )
    };
    let key = crate::model::ServiceKey { host, port };
    let clusters = runtime.clusters.get(&key)?;
    if name.starts_with("inbound-vip|") {
        // The ambient east-west gateway's cluster of a service port: its tunnels'.
        return clusters.tunnels.clone();
    }
    clusters.get(subset.as_deref()).cloned()
}

/// The served member at a host's address.
fn member<'a>(
    cluster: &'a crate::upstream::Cluster,
    address: &HostAddress,
) -> Option<&'a crate::upstream::Member> {
    let authority = address.authority.as_deref()?;
    cluster
        .members
        .iter()
        .find(|m| m.endpoint.authority() == authority)
}
