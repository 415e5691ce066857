//! Nanoseconds per `strait::route::resolve` (SNI → server, service, subset) over service
//! tables of 1, 1,000 and 100,000 service ports: the lookup every passthrough connection
//! makes, which must not grow with the size of the mesh. Against a `*.local` server (the
//! file form) and against a server listing every host exactly (what istiod sends).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use strait::model::{
    HostMatch, HostSet, ServerSpec, ServerTlsMode, ServicePort, Services, Subset, TrafficPolicy,
};
use strait::route::resolve;

fn table(n: usize) -> Services {
    let mut services = Services::new();
    for i in 0..n {
        let mut subsets = BTreeMap::new();
        for v in ["v1", "v2"] {
            subsets.insert(
                v.to_string(),
                Subset {
                    name: v.into(),
                    labels: BTreeMap::new(),
                    endpoints: vec![],
                    policy: TrafficPolicy::default(),
                },
            );
        }
        let svc = ServicePort {
            host: host(i),
            namespace: format!("ns{}", i % 100),
            port: 9080,
            port_name: "tcp".into(),
            endpoints: vec![],
            policy: TrafficPolicy::default(),
            tunnel_policy: TrafficPolicy::default(),
            subsets,
            resolution: Default::default(),
            default_route: Default::default(),
        };
        services.insert(svc.key(), Arc::new(svc));
    }
    services
}

fn host(i: usize) -> String {
    format!("svc{i}.ns{}.svc.cluster.local", i % 100)
}

fn route(c: &mut Criterion) {
    let servers = vec![ServerSpec {
        name: "istio-system/cross-network-gateway/0".into(),
        mode: ServerTlsMode::AutoPassthrough,
        hosts: HostSet::new(vec![HostMatch::parse("*.local")]),
        alpn: None,
        routes: Vec::new(),
        rbac: Vec::new(),
        vips: Vec::new(),
        http2: Default::default(),
        sources: Default::default(),
    }];
    let mut group = c.benchmark_group("route_resolve");
    for n in [1usize, 1_000, 100_000] {
        let services = table(n);
        let listed = vec![ServerSpec {
            name: "xds/0.0.0.0_15443/0".into(),
            mode: ServerTlsMode::AutoPassthrough,
            hosts: HostSet::new((0..n).map(|i| HostMatch::Exact(host(i))).collect()),
            alpn: None,
            routes: Vec::new(),
            rbac: Vec::new(),
            vips: Vec::new(),
            http2: Default::default(),
            sources: Default::default(),
        }];
        let target = host(n / 2);
        let hit = format!("outbound_.9080_._.{target}");
        let subset = format!("outbound_.9080_.v2_.{target}");
        // Sanity: the inputs route (or miss) as named, or the numbers measure another path.
        assert!(resolve(&servers, &services, Some(&hit)).is_ok());
        assert_eq!(
            resolve(&servers, &services, Some(&subset))
                .expect("subset routes")
                .subset,
            Some("v2")
        );
        group.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, sni| {
            b.iter(|| resolve(&servers, &services, black_box(Some(sni.as_str()))).is_ok())
        });
        group.bench_with_input(BenchmarkId::new("hit_subset", n), &subset, |b, sni| {
            b.iter(|| resolve(&servers, &services, black_box(Some(sni.as_str()))).is_ok())
        });
        assert!(resolve(&listed, &services, Some(&hit)).is_ok());
        group.bench_with_input(BenchmarkId::new("hit_listed_hosts", n), &hit, |b, sni| {
            b.iter(|| resolve(&listed, &services, black_box(Some(sni.as_str()))).is_ok())
        });
        // A host no server lists: the refusal must not cost a copy of the list.
        let unlisted = "outbound_.9080_._.nowhere.ns0.svc.cluster.local".to_string();
        assert_eq!(
            resolve(&listed, &services, Some(&unlisted))
                .unwrap_err()
                .reason(),
            "host_not_in_gateway"
        );
        group.bench_with_input(
            BenchmarkId::new("miss_unlisted_host", n),
            &unlisted,
            |b, sni| b.iter(|| resolve(&listed, &services, black_box(Some(sni.as_str()))).is_err()),
        );
        // A declared host on an undeclared port: the miss names the declared ports.
        let miss = format!("outbound_.9999_._.{target}");
        assert_eq!(
            resolve(&servers, &services, Some(&miss))
                .unwrap_err()
                .reason(),
            "unknown_service"
        );
        group.bench_with_input(BenchmarkId::new("miss_unknown_port", n), &miss, |b, sni| {
            b.iter(|| resolve(&servers, &services, black_box(Some(sni.as_str()))).is_err())
        });
    }
    group.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
