//! Load balancers (`ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`, all weighted) over the
//! healthy endpoints of the best locality priority.

use super::{Cluster, Cursor, Purpose};
use crate::model::{LbPolicy, Locality};

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
    cursor: Cursor,
}

impl Balancer {
    pub(super) fn new(lb: LbPolicy, weights: &[u32]) -> Self {
        Balancer {
            lb,
            schedule: smooth_schedule(weights),
            cursor: Cursor::default(),
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

/// Locality priority of an endpoint relative to the gateway: lower is preferred.
fn priority(ep: &Locality, gw: &Locality, failover: &[(String, String)]) -> u8 {
    if gw.region.is_empty() {
        return 0;
    }
    if ep.region == gw.region {
        if ep.zone == gw.zone {
            if ep.subzone == gw.subzone { 0 } else { 1 }
        } else {
            2
        }
    } else if failover
        .iter()
        .any(|(from, to)| *from == gw.region && *to == ep.region)
    {
        3
    } else {
        4
    }
}

pub(super) fn pick(cluster: &Cluster, purpose: Purpose, gw: &Locality, exclude: &[usize]) -> Pick {
    let members = &cluster.members;
    let mut eligible: Vec<usize> = (0..members.len())
        .filter(|&i| purpose == Purpose::Terminated || !members[i].endpoint.tls_disabled)
        .collect();
    if eligible.is_empty() {
        return Pick::NoEndpoint;
    }
    let total_eligible = eligible.len();
    eligible.retain(|i| !exclude.contains(i));
    let healthy: Vec<usize> = eligible
        .iter()
        .copied()
        .filter(|&i| !members[i].state.is_ejected())
        .collect();
    let min_health = cluster
        .policy
        .outlier
        .as_ref()
        .map_or(0, |o| o.min_health_percent);
    // Below minHealthPercent, ejection is ignored (Envoy's panic threshold).
    let pool = if min_health > 0 && healthy.len() * 100 < total_eligible * min_health as usize {
        eligible
    } else {
        healthy
    };
    if pool.is_empty() {
        return Pick::NoHealthy;
    }
    // Locality-aware priority takes effect with outlier detection, as in Istio.
    let locality_on = cluster.policy.outlier.is_some()
        && cluster
            .policy
            .locality_lb
            .as_ref()
            .is_none_or(|l| l.enabled);
    let pool = if locality_on {
        let failover = cluster
            .policy
            .locality_lb
            .as_ref()
            .map(|l| l.failover.as_slice())
            .unwrap_or(&[]);
        let prio = |i: usize| priority(&members[i].endpoint.locality, gw, failover);
        let best = pool.iter().map(|&i| prio(i)).min().unwrap_or(0);
        pool.into_iter().filter(|&i| prio(i) == best).collect()
    } else {
        pool
    };
    let choice = match cluster.balancer.lb {
        LbPolicy::RoundRobin => round_robin(cluster, &pool),
        LbPolicy::Random => weighted_random(cluster, &pool),
        LbPolicy::LeastRequest => least_request(cluster, &pool),
    };
    Pick::Member(choice)
}

fn round_robin(cluster: &Cluster, pool: &[usize]) -> usize {
    let schedule = &cluster.balancer.schedule;
    if pool.len() == cluster.members.len() {
        let n = cluster.balancer.cursor.next();
        return schedule[n % schedule.len()] as usize;
    }
    // Walk the schedule from the cursor to the next member in the pool.
    for _ in 0..schedule.len() {
        let n = cluster.balancer.cursor.next();
        let m = schedule[n % schedule.len()] as usize;
        if pool.contains(&m) {
            return m;
        }
    }
    pool[0]
}

fn weight(cluster: &Cluster, i: usize) -> u64 {
    cluster.members[i].endpoint.weight.max(1) as u64
}

fn weighted_random(cluster: &Cluster, pool: &[usize]) -> usize {
    let total: u64 = pool.iter().map(|&i| weight(cluster, i)).sum();
    let mut r = fastrand::u64(0..total.max(1));
    for &i in pool {
        let w = weight(cluster, i);
        if r < w {
            return i;
        }
        r -= w;
    }
    pool[pool.len() - 1]
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

    #[test]
    fn locality_priority_order() {
        let gw = Locality::parse("r1/z1/s1");
        let p = |s: &str| priority(&Locality::parse(s), &gw, &[("r1".into(), "r3".into())]);
        assert_eq!(p("r1/z1/s1"), 0);
        assert_eq!(p("r1/z1/s2"), 1);
        assert_eq!(p("r1/z2/s1"), 2);
        assert_eq!(p("r3/z1/s1"), 3);
        assert_eq!(p("r2/z1/s1"), 4);
    }
}
