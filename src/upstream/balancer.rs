//! Load balancers (`ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`, all weighted by endpoint
//! `weight`) over the eligible, healthy endpoints that the locality plan allows.

use super::locality::Plan;
use super::{Cluster, Cursor, Purpose, outlier};
use crate::model::{LbPolicy, weighted_index};

/// Outcome of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Member(usize),
    /// No endpoint is eligible for this purpose (none declared, or all filtered).
    NoEndpoint,
    /// Endpoints exist but all are ejected or already tried.
    NoHealthy,
}

impl Pick {
    pub fn member(self) -> Option<usize> {
        match self {
            Pick::Member(i) => Some(i),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub(super) struct Balancer {
    lb: LbPolicy,
    /// Weighted round-robin order: member indexes, interleaved by weight.
    schedule: Vec<u32>,
    /// Round-robin positions, one per pool a plan picks from (priority level, locality
    /// group; slot 0 for the whole cluster), so that picks from one pool do not move
    /// another's: interleaved on one cursor, the first member of a pool after another
    /// pool's members would take most of its picks. Pools beyond the slots share them.
    cursors: [Cursor; POOL_CURSORS],
}

/// Round-robin cursors per cluster; see [`Balancer::cursors`].
const POOL_CURSORS: usize = 4;

impl Balancer {
    pub(super) fn new(lb: LbPolicy, weights: &[u32]) -> Self {
        Balancer {
            lb,
            schedule: smooth_schedule(weights),
            cursors: Default::default(),
        }
    }
}

/// Nginx's smooth weighted round robin, unrolled into a fixed schedule so picking needs
/// only an atomic cursor. Weights are divided by their gcd and the schedule is capped.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<i64> = weights.iter().map(|&x| (x / g).max(1) as i64).collect();
    let mut total: i64 = w.iter().sum();
    const CAP: i64 = 10_000;
    if total > CAP {
        let scale = total as f64 / CAP as f64;
        for x in w.iter_mut() {
            *x = ((*x as f64 / scale).round() as i64).max(1);
        }
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

pub(super) fn pick(
    cluster: &Cluster,
    plan: &Plan,
    purpose: Purpose,
    network: &str,
    exclude: &[usize],
) -> Pick {
    let members = &cluster.members;
    let mut eligible: Vec<usize> = (0..members.len())
        .filter(|&i| purpose.exclusion(&members[i].endpoint, network).is_none())
        .collect();
    if eligible.is_empty() {
        return Pick::NoEndpoint;
    }
    // Health is judged over every eligible member, before this connection's own
    // failed attempts are set aside.
    let healthy_count = eligible
        .iter()
        .filter(|&&i| !cluster.is_ejected(&members[i]))
        .count();
    let min_health = cluster
        .policy
        .outlier
        .as_ref()
        .map_or(0, |o| o.min_health_percent);
    // Below minHealthPercent, ejection is ignored (Envoy's panic threshold).
    let panic = outlier::panicking(healthy_count, eligible.len(), min_health);
    let healthy = |i: usize| panic || !cluster.is_ejected(&members[i]);
    // Every member this purpose may use, healthy or not: what a priority's health is
    // judged against.
    let mut considered = match plan {
        Plan::Priority(_) | Plan::PriorityWeighted { .. } => eligible.clone(),
        _ => Vec::new(),
    };
    eligible.retain(|&i| !exclude.contains(&i) && healthy(i));
    // A bridge's own network is a tier above every other: remote networks cost a
    // gateway hop and are the failover, whatever the locality plan says within a tier.
    if purpose == Purpose::Bridge
        && eligible
            .iter()
            .any(|&i| super::in_network(&members[i].endpoint, network))
    {
        eligible.retain(|&i| super::in_network(&members[i].endpoint, network));
        considered.retain(|&i| super::in_network(&members[i].endpoint, network));
    }
    // Which round-robin cursor the pool uses: 0 for the whole cluster, else one per
    // level or group.
    let mut pool_key = 0;
    let pool = match plan {
        Plan::Flat => eligible,
        Plan::Priority(prio) => {
            if let Some(level) = pick_priority(&considered, &eligible, prio, healthy) {
                eligible.retain(|&i| prio[i] == level);
                pool_key = usize::from(level) + 1;
            }
            eligible
        }
        Plan::Distribute {
            group_of,
            group_weight,
        } => {
            eligible.retain(|&i| group_of[i].is_some());
            match pick_group(&eligible, group_of, group_weight) {
                Some(g) => {
                    eligible.retain(|&i| group_of[i] == Some(g));
                    pool_key = g + 1;
                    eligible
                }
                None => Vec::new(),
            }
        }
        Plan::PriorityWeighted {
            priority,
            group_of,
            group_weight,
        } => {
            eligible.retain(|&i| group_of[i].is_some());
            if let Some(level) = pick_priority(&considered, &eligible, priority, healthy) {
                eligible.retain(|&i| priority[i] == level);
            }
            match pick_group(&eligible, group_of, group_weight) {
                Some(g) => {
                    eligible.retain(|&i| group_of[i] == Some(g));
                    pool_key = g + 1;
                    eligible
                }
                None => Vec::new(),
            }
        }
    };
    if pool.is_empty() {
        return Pick::NoHealthy;
    }
    let choice = match cluster.balancer.lb {
        LbPolicy::RoundRobin => round_robin(cluster, &pool, pool_key),
        LbPolicy::Random => weighted_random(cluster, &pool),
        LbPolicy::LeastRequest => least_request(cluster, &pool),
    };
    Pick::Member(choice)
}

/// The priority level that takes a new connection, as Envoy shares load between
/// levels (`LoadBalancerBase::recalculatePerPriorityState`): a level's health is its
/// share of healthy members among `considered`, times the overprovisioning factor 1.4,
/// at most 100 %; the levels, best first, each take as much of the load as their health
/// (scaled up when the healths add up to less than 100 %), until none is left, and any
/// rounding remainder goes to the first level with health. A level with 3 of 4 members
/// healthy keeps all its load, one with 1 of 2 keeps 70 % and spills 30 % to the next,
/// rather than piling everything on its last members. A level none of whose members is
/// in `pool` (this connection's candidates) takes nothing; when every level is so, the
/// best level in `pool`.
fn pick_priority(
    considered: &[usize],
    pool: &[usize],
    priority: &[u8],
    healthy: impl Fn(usize) -> bool,
) -> Option<u8> {
    // (level, members, healthy members, members in the pool), best level first.
    let mut levels: Vec<(u8, u64, u64, bool)> = Vec::new();
    for &i in considered {
        let p = priority[i];
        let k = match levels.iter().position(|l| l.0 == p) {
            Some(k) => k,
            None => {
                levels.push((p, 0, 0, false));
                levels.len() - 1
            }
        };
        levels[k].1 += 1;
        levels[k].2 += u64::from(healthy(i));
    }
    for &i in pool {
        if let Some(l) = levels.iter_mut().find(|l| l.0 == priority[i]) {
            l.3 = true;
        }
    }
    levels.sort_unstable_by_key(|l| l.0);
    let health: Vec<u64> = levels
        .iter()
        .map(|&(_, all, up, _)| overprovisioned(100, up, all))
        .collect();
    let total = health.iter().sum::<u64>().min(100);
    let mut load = vec![0u64; levels.len()];
    // No health anywhere leaves every load at 0 (the fallback below).
    let mut left = 100;
    for (l, h) in load.iter_mut().zip(&health) {
        *l = (h * 100).checked_div(total).unwrap_or(0).min(left);
        left -= *l;
    }
    if let Some(first) = health.iter().position(|&h| h > 0) {
        load[first] += left;
    }
    for (l, level) in load.iter_mut().zip(&levels) {
        if !level.3 {
            *l = 0;
        }
    }
    match weighted_index(load.iter().copied()) {
        Some(k) => Some(levels[k].0),
        None => pool.iter().map(|&i| priority[i]).min(),
    }
}

/// A locality group, at random by weight, among the groups that still have a member in
/// `pool`. As in Envoy, a group's weight is scaled by its share of members in the pool
/// with an overprovisioning factor of 1.4: a locality with 3 of 4 members left keeps its
/// whole weight, one with 1 of 4 keeps 35 % of it.
fn pick_group(pool: &[usize], group_of: &[Option<usize>], weights: &[u64]) -> Option<usize> {
    let mut members = vec![0u64; weights.len()];
    for g in group_of.iter().flatten() {
        members[*g] += 1;
    }
    let mut left = vec![0u64; weights.len()];
    for &i in pool {
        if let Some(g) = group_of[i] {
            left[g] += 1;
        }
    }
    let effective: Vec<u64> = (0..weights.len())
        // In thousandths, so a small weight keeps its proportion.
        .map(|g| overprovisioned(weights[g] * 1000, left[g], members[g]))
        .collect();
    weighted_index(effective.into_iter())
}

/// Envoy's overprovisioning factor of 1.4 applied to `full`: what `up` of `all` members
/// cover of it, never more than the whole (3 of 4 cover all of it, 1 of 4 covers 35 %).
fn overprovisioned(full: u64, up: u64, all: u64) -> u64 {
    let all = all.max(1) * 100;
    full * (up * 140).min(all) / all
}

fn round_robin(cluster: &Cluster, pool: &[usize], pool_key: usize) -> usize {
    let schedule = &cluster.balancer.schedule;
    let cursor = &cluster.balancer.cursors[pool_key % POOL_CURSORS];
    if pool.len() == cluster.members.len() {
        let n = cursor.next();
        return schedule[n % schedule.len()] as usize;
    }
    // Walk the schedule from the cursor to the next member in the pool, so the pool
    // keeps the members' weighted order.
    let mut in_pool = vec![false; cluster.members.len()];
    for &i in pool {
        in_pool[i] = true;
    }
    for _ in 0..schedule.len() {
        let n = cursor.next();
        let m = schedule[n % schedule.len()] as usize;
        if in_pool[m] {
            return m;
        }
    }
    pool[0]
}

fn weight(cluster: &Cluster, i: usize) -> u64 {
    cluster.members[i].endpoint.weight.max(1) as u64
}

fn weighted_random(cluster: &Cluster, pool: &[usize]) -> usize {
    weighted_index(pool.iter().map(|&i| weight(cluster, i)))
        .map_or(pool[pool.len() - 1], |k| pool[k])
}

/// Power of two choices on active connections, weighted: the lower `active / weight` wins.
fn least_request(cluster: &Cluster, pool: &[usize]) -> usize {
    if pool.len() == 1 {
        return pool[0];
    }
    let a = weighted_random(cluster, pool);
    let mut b = weighted_random(cluster, pool);
    if a == b {
        // Any other member, so the two choices differ.
        let pos = pool.iter().position(|&i| i == a).unwrap_or(0);
        b = pool[(pos + 1 + fastrand::usize(0..pool.len() - 1)) % pool.len()];
    }
    let load = |i: usize| cluster.members[i].state.active() as u64 * 1000 / weight(cluster, i);
    if load(b) < load(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_weighted_and_interleaved() {
        let s = smooth_schedule(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        // Smooth: the heavy member never runs more than its share in a row.
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[80, 20]).len(), 5);
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
    }

    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use crate::model::Locality;
    use crate::model::{
        Endpoint, EndpointAddress, LocalityLbSetting, OutlierDetection, ServicePort, TrafficPolicy,
    };
    use crate::upstream::{Origin, StateRegistry};

    fn endpoint(last: u8, weight: u32, locality: &str, network: &str) -> Endpoint {
        Endpoint {
            address: EndpointAddress::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))),
            port: 8080,
            labels: BTreeMap::new(),
            locality: Locality::parse(locality),
            network: network.into(),
            weight,
            service_account: None,
            tls_disabled: false,
            reach: crate::model::Reach::Any,
            priority: None,
            locality_weight: None,
        }
    }

    fn cluster(endpoints: Vec<Endpoint>, policy: TrafficPolicy) -> Cluster {
        let service = Arc::new(ServicePort {
            host: "svc.test".into(),
            namespace: "default".into(),
            port: 80,
            port_name: "tcp".into(),
            endpoints,
            tunnel_policy: policy.clone(),
            policy,
            subsets: BTreeMap::new(),
            resolution: Default::default(),
            default_route: Default::default(),
        });
        Cluster::new(service, None, &StateRegistry::default()).unwrap()
    }

    /// An endpoint reached by tunnels only is a member of the tunnels' cluster alone, and
    /// each path balances over its own members: picks on one cluster never move the
    /// other's round robin, so interleaved 15443 and 15008 connections still spread.
    #[test]
    fn an_endpoint_for_tunnels_only_is_a_member_of_the_tunnels_cluster_alone() {
        use crate::model::{Reach, TUNNEL_LABEL};
        let hbone = |last: u8, reach: Reach| Endpoint {
            labels: [(TUNNEL_LABEL.to_string(), "http".to_string())].into(),
            reach,
            ..endpoint(last, 1, "", "")
        };
        let service = Arc::new(ServicePort {
            host: "svc.test".into(),
            namespace: "default".into(),
            port: 80,
            port_name: "tcp".into(),
            endpoints: vec![
                endpoint(1, 1, "", ""),
                hbone(2, Reach::Any),
                hbone(3, Reach::Tunnels),
            ],
            policy: lb(LbPolicy::RoundRobin),
            tunnel_policy: lb(LbPolicy::RoundRobin),
            subsets: BTreeMap::new(),
            resolution: Default::default(),
            default_route: Default::default(),
        });
        let registry = StateRegistry::default();
        let all = Cluster::new(service.clone(), None, &registry).unwrap();
        let tunnels = Cluster::tunnels(service.clone(), &registry).unwrap();
        let names = |c: &Cluster| -> Vec<String> {
            c.members.iter().map(|m| m.endpoint.authority()).collect()
        };
        assert_eq!(names(&all), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(names(&tunnels), ["10.0.0.2:8080", "10.0.0.3:8080"]);
        // The endpoint both list is one endpoint: its connections and failures are shared.
        assert!(Arc::ptr_eq(
            &all.members[1].state,
            &tunnels.members[0].state
        ));
        let gw = Locality::default();
        let mut seen = [[0usize; 2]; 2];
        for _ in 0..10 {
            seen[0][all.pick(Purpose::Terminated, &gw, &[]).member().unwrap()] += 1;
            seen[1][tunnels.pick(Purpose::Hbone, &gw, &[]).member().unwrap()] += 1;
        }
        assert_eq!(seen, [[5, 5], [5, 5]]);
        // Whatever cluster it sits in, no path but 15008 may use it.
        let only = &service.endpoints[2];
        for p in [
            Purpose::Passthrough,
            Purpose::Tls,
            Purpose::Terminated,
            Purpose::Bridge,
        ] {
            assert!(p.exclusion(only, "").is_some(), "{p:?}");
        }
        assert_eq!(Purpose::allowed(only, ""), ["HBONE"]);
        assert_eq!(
            Purpose::allowed(&service.endpoints[0], ""),
            ["AUTO_PASSTHROUGH", "PASSTHROUGH", "ISTIO_MUTUAL", "BRIDGE"]
        );
        // A service port without an HBONE endpoint has no tunnels' cluster.
        let plain = Arc::new(ServicePort {
            endpoints: vec![endpoint(1, 1, "", "")],
            ..ServicePort::clone(&service)
        });
        assert!(Cluster::tunnels(plain, &registry).is_none());
    }

    /// The tunnels' cluster has its own policy: with outlier detection on the service
    /// (15443's) and none on the tunnels (istiod's `inbound-vip`), an endpoint 15443
    /// ejected is still dialled by tunnels, and the tunnels' failures neither eject nor
    /// count towards 15443's consecutive errors.
    #[test]
    fn the_tunnels_cluster_ejects_and_skips_only_by_its_own_outlier_detection() {
        use crate::model::TUNNEL_LABEL;
        let hbone = |last: u8| Endpoint {
            labels: [(TUNNEL_LABEL.to_string(), "http".to_string())].into(),
            ..endpoint(last, 1, "", "")
        };
        let service = Arc::new(ServicePort {
            host: "svc.test".into(),
            namespace: "default".into(),
            port: 80,
            port_name: "tcp".into(),
            endpoints: vec![hbone(1), hbone(2)],
            policy: TrafficPolicy {
                outlier: Some(OutlierDetection {
                    consecutive_errors: 2,
                    max_ejection_percent: 100,
                    ..Default::default()
                }),
                ..lb(LbPolicy::RoundRobin)
            },
            tunnel_policy: lb(LbPolicy::RoundRobin),
            subsets: BTreeMap::new(),
            resolution: Default::default(),
            default_route: Default::default(),
        });
        let registry = StateRegistry::default();
        let all = Cluster::new(service.clone(), None, &registry).unwrap();
        let tunnels = Cluster::tunnels(service, &registry).unwrap();
        // Tunnel failures: counted, never an ejection, never 15443's consecutive errors.
        for _ in 0..5 {
            assert_eq!(tunnels.record_failure(0), None);
        }
        assert_eq!(all.members[0].state.total_failures(), 5);
        assert_eq!(all.members[0].state.consecutive_failures(), 0);
        assert!(!all.members[0].state.is_ejected());
        // 15443's own failures eject it there; the tunnels still pick it.
        assert_eq!(all.record_failure(0), None);
        assert!(all.record_failure(0).is_some());
        assert!(all.is_ejected(&all.members[0]));
        assert!(!tunnels.is_ejected(&tunnels.members[0]));
        let gw = nowhere();
        let mut seen = [[0usize; 2]; 2];
        for _ in 0..10 {
            seen[0][all.pick(Purpose::Terminated, &gw, &[]).member().unwrap()] += 1;
            seen[1][tunnels.pick(Purpose::Hbone, &gw, &[]).member().unwrap()] += 1;
        }
        assert_eq!(seen, [[0, 10], [5, 5]]);
    }

    fn lb(lb: LbPolicy) -> TrafficPolicy {
        TrafficPolicy {
            lb,
            ..Default::default()
        }
    }

    /// How many of `n` picks each member gets.
    fn counts(c: &Cluster, origin: Origin<'_>, n: usize) -> Vec<usize> {
        let mut out = vec![0; c.members.len()];
        for _ in 0..n {
            out[c.pick(Purpose::Passthrough, origin, &[]).member().unwrap()] += 1;
        }
        out
    }

    fn nowhere() -> Locality {
        Locality::default()
    }

    #[test]
    fn round_robin_is_exact_and_cycles() {
        let c = cluster(
            (1..=3).map(|i| endpoint(i, 1, "", "")).collect(),
            lb(LbPolicy::RoundRobin),
        );
        let gw = nowhere();
        let order: Vec<usize> = (0..6)
            .map(|_| c.pick(Purpose::Passthrough, &gw, &[]).member().unwrap())
            .collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(counts(&c, (&gw).into(), 300), vec![100, 100, 100]);
    }

    #[test]
    fn weights_are_honoured_by_all_three_balancers() {
        let gw = nowhere();
        let eps = || vec![endpoint(1, 80, "", ""), endpoint(2, 20, "", "")];
        // Round robin is exact.
        let rr = cluster(eps(), lb(LbPolicy::RoundRobin));
        assert_eq!(counts(&rr, (&gw).into(), 1000), vec![800, 200]);
        // Random ones are within 2 points over 20,000 picks (sd ~0.3 points).
        fastrand::seed(7);
        for policy in [LbPolicy::Random, LbPolicy::LeastRequest] {
            let c = cluster(eps(), lb(policy));
            let n = counts(&c, (&gw).into(), 20_000);
            let share = n[0] as f64 / 20_000.0;
            assert!((share - 0.8).abs() < 0.02, "{policy:?}: {n:?}");
        }
    }

    #[test]
    fn least_request_keeps_new_connections_off_a_loaded_endpoint() {
        let gw = nowhere();
        let c = cluster(
            (1..=3).map(|i| endpoint(i, 1, "", "")).collect(),
            lb(LbPolicy::LeastRequest),
        );
        c.members[0]
            .state
            .active
            .store(10, std::sync::atomic::Ordering::Relaxed);
        let n = counts(&c, (&gw).into(), 1000);
        assert_eq!(n[0], 0, "{n:?}");
        assert!(n[1] > 400 && n[2] > 400, "{n:?}");
    }

    fn with_outlier(min_health: u32) -> TrafficPolicy {
        TrafficPolicy {
            outlier: Some(OutlierDetection {
                consecutive_errors: 1,
                max_ejection_percent: 100,
                min_health_percent: min_health,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_panic() {
        let gw = nowhere();
        let eps = || (1..=4).map(|i| endpoint(i, 1, "", "")).collect::<Vec<_>>();
        let c = cluster(eps(), with_outlier(0));
        assert!(c.record_failure(0).is_some());
        assert!(c.record_failure(1).is_some());
        assert_eq!(counts(&c, (&gw).into(), 100), vec![0, 0, 50, 50]);
        // At 50% healthy and minHealthPercent 75, ejection is ignored.
        let c = cluster(eps(), with_outlier(75));
        c.record_failure(0);
        c.record_failure(1);
        assert_eq!(counts(&c, (&gw).into(), 100), vec![25, 25, 25, 25]);
        // Tried members are excluded even in panic.
        assert_eq!(
            c.pick(Purpose::Passthrough, &gw, &[0, 1, 2, 3]),
            Pick::NoHealthy
        );
    }

    #[test]
    fn locality_prefers_own_then_fails_over_by_priority() {
        let gw = Locality::parse("r1/z1/s1");
        let mut policy = with_outlier(0);
        policy.locality_lb = Some(LocalityLbSetting {
            enabled: true,
            distribute: vec![],
            failover: vec![("r1".into(), "r3".into())],
        });
        let c = cluster(
            vec![
                endpoint(1, 1, "r2/z1/s1", ""),
                endpoint(2, 1, "r3/z1/s1", ""),
                endpoint(3, 1, "r1/z2/s1", ""),
                endpoint(4, 1, "r1/z1/s1", ""),
            ],
            policy,
        );
        assert_eq!(counts(&c, (&gw).into(), 10), vec![0, 0, 0, 10]);
        c.record_failure(3);
        assert_eq!(counts(&c, (&gw).into(), 10), vec![0, 0, 10, 0]);
        c.record_failure(2);
        assert_eq!(
            counts(&c, (&gw).into(), 10),
            vec![0, 10, 0, 0],
            "failover rule: r3 before r2"
        );
        c.record_failure(1);
        assert_eq!(counts(&c, (&gw).into(), 10), vec![10, 0, 0, 0]);
    }

    /// Envoy's priority load: a level that loses members keeps the load its health
    /// (1.4 × its healthy share) covers and spills the rest to the next level, whether
    /// the levels come from `localityLbSetting` or from the control plane.
    #[test]
    fn a_priority_losing_members_spills_its_uncovered_share_to_the_next() {
        let gw = Locality::parse("r1/z1/s1");
        let file = cluster(
            vec![
                endpoint(1, 1, "r1/z1/s1", ""),
                endpoint(2, 1, "r1/z1/s1", ""),
                endpoint(3, 1, "r1/z2/s1", ""),
                endpoint(4, 1, "r1/z2/s1", ""),
            ],
            TrafficPolicy {
                locality_lb: Some(LocalityLbSetting {
                    enabled: true,
                    distribute: vec![],
                    failover: vec![],
                }),
                ..with_outlier(0)
            },
        );
        let at = |last: u8, priority: u32| Endpoint {
            priority: Some(priority),
            ..endpoint(last, 1, "", "")
        };
        let pushed = cluster(
            vec![at(1, 0), at(2, 0), at(3, 1), at(4, 1), at(5, 1), at(6, 1)],
            with_outlier(0),
        );
        fastrand::seed(5);
        for c in [&file, &pushed] {
            let n = counts(c, (&gw).into(), 20_000);
            assert_eq!(n[0] + n[1], 20_000, "all healthy: the first level: {n:?}");
            // One of two left: 70 % stays, on the one left; 30 % goes to the next level.
            c.record_failure(0);
            let n = counts(c, (&gw).into(), 20_000);
            let share = |k: usize| n[k] as f64 / 20_000.0;
            assert_eq!(n[0], 0, "{n:?}");
            assert!((share(1) - 0.7).abs() < 0.02, "{n:?}");
            let next: Vec<f64> = (2..n.len()).map(share).collect();
            assert!((next.iter().sum::<f64>() - 0.3).abs() < 0.02, "{n:?}");
            // Round robin within the next level stays even, though picks alternate
            // between the levels.
            let (lo, hi) = next
                .iter()
                .fold((1.0f64, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            assert!(hi - lo < 0.02, "{n:?}");
            // None left: the next level takes everything.
            c.record_failure(1);
            let n = counts(c, (&gw).into(), 1000);
            assert_eq!(n[0] + n[1], 0, "{n:?}");
        }
        // A level of four with three healthy covers its whole load (1.4 × 3/4 > 1).
        pushed.record_failure(2);
        let n = counts(&pushed, (&gw).into(), 1000);
        assert_eq!(n[3] + n[4] + n[5], 1000, "{n:?}");
    }

    #[test]
    fn distribute_splits_between_localities() {
        let gw = Locality::parse("r1/z1/s1");
        let policy = TrafficPolicy {
            locality_lb: Some(LocalityLbSetting {
                enabled: true,
                distribute: vec![(
                    "r1/z1/*".into(),
                    vec![("r1/z1/*".into(), 80), ("r1/z2/*".into(), 20)],
                )],
                failover: vec![],
            }),
            ..Default::default()
        };
        let c = cluster(
            vec![
                endpoint(1, 1, "r1/z1/s1", ""),
                endpoint(2, 1, "r1/z1/s2", ""),
                endpoint(3, 1, "r1/z2/s1", ""),
                endpoint(4, 1, "r2/z1/s1", ""),
            ],
            policy,
        );
        fastrand::seed(11);
        let n = counts(&c, (&gw).into(), 20_000);
        let share = |k: usize| n[k] as f64 / 20_000.0;
        assert!((share(0) + share(1) - 0.8).abs() < 0.02, "{n:?}");
        assert!((share(0) - 0.4).abs() < 0.02, "{n:?}");
        assert!((share(2) - 0.2).abs() < 0.02, "{n:?}");
        assert_eq!(n[3], 0, "r2 is named by no rule");
    }

    #[test]
    fn locality_weights_from_the_control_plane_split_within_the_best_priority() {
        let gw = nowhere();
        let at = |last: u8, locality: &str, priority: u32, weight: u32| Endpoint {
            priority: Some(priority),
            locality_weight: Some(weight),
            ..endpoint(last, 1, locality, "")
        };
        let c = cluster(
            vec![
                at(1, "r1/z1/s1", 0, 80),
                at(2, "r1/z1/s1", 0, 80),
                at(3, "r1/z2/s1", 0, 20),
                at(4, "r1/z3/s1", 0, 0),
                at(5, "r2/z1/s1", 1, 50),
            ],
            with_outlier(0),
        );
        fastrand::seed(7);
        let n = counts(&c, (&gw).into(), 20_000);
        let share = |k: usize| n[k] as f64 / 20_000.0;
        assert!((share(0) + share(1) - 0.8).abs() < 0.02, "{n:?}");
        assert!((share(2) - 0.2).abs() < 0.02, "{n:?}");
        assert_eq!(
            (n[3], n[4]),
            (0, 0),
            "weight 0, and the next priority: {n:?}"
        );
        // One of the two members of the 80 % locality left: 1.4 × 1/2 keeps 70 % of
        // its weight, 56 against 20.
        c.record_failure(0);
        let n = counts(&c, (&gw).into(), 20_000);
        let share = |k: usize| n[k] as f64 / 20_000.0;
        assert_eq!(n[0], 0, "{n:?}");
        assert!((share(1) - 56.0 / 76.0).abs() < 0.02, "{n:?}");
        // The whole priority gone: the next one takes everything.
        c.record_failure(1);
        c.record_failure(2);
        assert_eq!(counts(&c, (&gw).into(), 100), vec![0, 0, 0, 0, 100]);
    }

    #[test]
    fn passthrough_sees_only_the_gateway_network() {
        let gw = nowhere();
        let c = cluster(
            vec![
                endpoint(1, 1, "", "net-a"),
                endpoint(2, 1, "", "net-b"),
                endpoint(3, 1, "", ""),
            ],
            lb(LbPolicy::RoundRobin),
        );
        let in_a = Origin {
            locality: &gw,
            network: "net-a",
        };
        assert_eq!(counts(&c, in_a, 10), vec![5, 0, 5]);
        // Terminated traffic may use any network (the bridge reaches it via its gateway).
        let t: Vec<usize> = (0..3)
            .map(|_| c.pick(Purpose::Terminated, in_a, &[]).member().unwrap())
            .collect();
        assert!(t.contains(&1));
        // A gateway with no network set sees everything, as Istio without a network view.
        assert_eq!(counts(&c, (&gw).into(), 9), vec![3, 3, 3]);
        let in_c = Origin {
            locality: &gw,
            network: "net-c",
        };
        let only_b = cluster(vec![endpoint(2, 1, "", "net-b")], lb(LbPolicy::RoundRobin));
        assert_eq!(
            only_b.pick(Purpose::Passthrough, in_c, &[]),
            Pick::NoEndpoint
        );
    }

    #[test]
    fn bridge_prefers_its_own_network_and_fails_over_to_others() {
        let gw = Locality::parse("r1/z1");
        let policy = TrafficPolicy {
            lb: LbPolicy::RoundRobin,
            outlier: Some(OutlierDetection {
                consecutive_errors: 1,
                max_ejection_percent: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = cluster(
            vec![
                endpoint(1, 1, "r1/z2", "net-a"),
                endpoint(2, 1, "r1/z1", "net-b"),
                endpoint(3, 1, "r1/z1", ""),
                endpoint(4, 5, "r1/z1", "net-b"),
            ],
            policy,
        );
        let in_a = Origin {
            locality: &gw,
            network: "net-a",
        };
        let pick = |exclude: &[usize]| c.pick(Purpose::Bridge, in_a, exclude);
        // Own network (and no network) first; locality decides within it: z1 is the
        // bridge's own zone, so member 2 (no network, z1) wins over member 0 (z2).
        for _ in 0..4 {
            assert_eq!(pick(&[]), Pick::Member(2));
        }
        // The caller set it aside (tried, or unreachable): the own network's other zone.
        assert_eq!(pick(&[2]), Pick::Member(0));
        // No local endpoint left: remote ones, by weight.
        let mut remote = [0usize; 4];
        for _ in 0..12 {
            remote[pick(&[0, 2]).member().unwrap()] += 1;
        }
        assert_eq!(remote, [0, 2, 0, 10]);
        // Local endpoints ejected: traffic fails over to the remote network, and comes
        // back once they are healthy again (here: a fresh cluster state).
        c.record_failure(0);
        c.record_failure(2);
        assert!(c.members[0].state.is_ejected() && c.members[2].state.is_ejected());
        let m = pick(&[]).member().unwrap();
        assert!(m == 1 || m == 3, "picked {m}");
        c.members[0]
            .state
            .ejected_until
            .store(0, std::sync::atomic::Ordering::Relaxed);
        c.members[2]
            .state
            .ejected_until
            .store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(pick(&[]), Pick::Member(2));
        // Passthrough never sees another network, whatever a bridge would do.
        assert_ne!(c.pick(Purpose::Passthrough, in_a, &[0, 2]), Pick::Member(1));
    }
}
