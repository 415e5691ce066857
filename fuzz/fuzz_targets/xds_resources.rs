//! Arbitrary bytes as a push from istiod: a sequence of LDS, CDS and EDS resources, each
//! read as the xDS client reads it, the accepted ones held and assembled into listeners
//! and service ports, then every server's hosts routed. No panic; a refused resource
//! says why; every route found points at a server and a service port that exist.
//!
//! Input: records of one kind byte (0 listener, 1 cluster, 2 endpoints, modulo 3), a
//! little-endian u16 length, and that many bytes of the encoded resource.
#![no_main]

use envoy_types::pb::google::protobuf::Any;
use libfuzzer_sys::fuzz_target;
use strait::route;
use strait::xds::translate::{self, Assembly, Held};

fuzz_target!(|data: &[u8]| {
    let mut held = Held::default();
    let mut rest = data;
    while let [kind, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (body, next) = tail.split_at(len);
        rest = next;
        let type_url = [translate::LISTENER, translate::CLUSTER, translate::ENDPOINTS]
            [usize::from(*kind % 3)];
        let any = Any {
            type_url: type_url.to_string(),
            value: body.to_vec(),
        };
        let refused = match kind % 3 {
            0 => translate::listener(&any).map(|(name, read)| {
                held.listeners.insert(name, read.value);
            }),
            1 => translate::cluster(&any).map(|(name, read)| {
                held.clusters.insert(name, read.value);
            }),
            _ => translate::endpoints(&any).map(|(name, read)| {
                held.endpoints.insert(name, read.value);
            }),
        };
        if let Err(why) = refused {
            assert!(!why.is_empty(), "a refusal without a reason");
        }
    }

    let mut assembly = Assembly::default();
    assembly.rebuild(&held);
    let eds = held.eds_names();
    assembly.update_endpoints(&held, &eds);
    let _ = assembly.awaiting_endpoints(&held);

    for listener in &assembly.listeners {
        let servers = &listener.servers;
        let mut names: Vec<Option<String>> = vec![None];
        for server in servers {
            names.extend(server.hosts.iter().map(|h| Some(h.to_string())));
            for r in &server.routes {
                names.extend(r.sni_hosts.iter().map(|h| Some(h.to_string())));
            }
        }
        for name in names.iter().take(64) {
            if let Ok(m) = route::resolve(servers, &assembly.services, name.as_deref()) {
                assert!(m.server < servers.len());
                assert!(
                    assembly.services.get(&m.service.key()).is_some(),
                    "a route to a service port that is not held"
                );
            }
        }
    }
});
