//! Locality-aware load balancing, as Istio programs Envoy for `localityLbSetting`:
//! either priority failover (own locality first, then the same zone, the same region,
//! `failover` target regions, anywhere) or `distribute` weights between localities.
//!
//! Which mode applies (Istio's `ApplyLocalityLoadBalancer`):
//! - `enabled: false` turns both off;
//! - a `distribute` rule whose `from` matches the gateway's locality splits traffic
//!   between the localities its `to` names, with or without outlier detection;
//! - otherwise priority failover, but only with outlier detection configured: without
//!   it an endpoint never leaves its priority, so traffic would never fail over.

use crate::model::{Locality, TrafficPolicy};

/// How one cluster spreads traffic over localities, for one gateway locality.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// Locality plays no part.
    Flat,
    /// Priority of each member (lower preferred); the best priority with a healthy
    /// member takes all traffic.
    Priority(Vec<u8>),
    /// Members grouped by locality with a weight per group; members in no group get
    /// no traffic.
    Distribute {
        group_of: Vec<Option<usize>>,
        group_weight: Vec<u64>,
    },
    /// The control plane's priorities, and within the best one a locality group picked
    /// by its weight (Envoy's locality-weighted balancing); members of a locality with
    /// weight 0 get no traffic.
    PriorityWeighted {
        priority: Vec<u8>,
        group_of: Vec<Option<usize>>,
        group_weight: Vec<u64>,
    },
}

impl Plan {
    /// The plan for members at `localities` (with endpoint `weights`) seen from `gateway`.
    pub(super) fn new(
        policy: &TrafficPolicy,
        gateway: &Locality,
        localities: &[&Locality],
        weights: &[u32],
    ) -> Plan {
        let setting = policy.locality_lb.as_ref();
        if setting.is_some_and(|s| !s.enabled) {
            return Plan::Flat;
        }
        if let Some(rule) = setting.and_then(|s| {
            s.distribute
                .iter()
                .find(|(from, _)| locality_match(gateway, from))
        }) {
            return distribute(&rule.1, localities, weights);
        }
        if policy.outlier.is_none() {
            return Plan::Flat;
        }
        let failover = setting.map(|s| s.failover.as_slice()).unwrap_or(&[]);
        Plan::Priority(
            localities
                .iter()
                .map(|l| priority(l, gateway, failover))
                .collect(),
        )
    }
}

/// The plan for priorities and locality weights as the control plane sent them: one
/// group per (priority, locality), weighted by the locality's weight.
pub(super) fn weighted(priority: Vec<u8>, localities: &[&Locality], weights: &[u32]) -> Plan {
    let mut groups: Vec<(u8, &Locality)> = Vec::new();
    let mut group_weight = Vec::new();
    let mut group_of = Vec::with_capacity(localities.len());
    for (m, l) in localities.iter().enumerate() {
        let weight = weights.get(m).copied().unwrap_or(0);
        if weight == 0 {
            group_of.push(None);
            continue;
        }
        let key = (priority.get(m).copied().unwrap_or(0), *l);
        let g = match groups.iter().position(|k| *k == key) {
            Some(g) => g,
            None => {
                groups.push(key);
                group_weight.push(weight as u64);
                groups.len() - 1
            }
        };
        group_of.push(Some(g));
    }
    Plan::PriorityWeighted {
        priority,
        group_of,
        group_weight,
    }
}

/// Istio's `util.LocalityMatch`: a rule `region/zone/subzone` where `*` (or a missing
/// part below the region) matches anything.
pub(super) fn locality_match(locality: &Locality, rule: &str) -> bool {
    let mut parts = rule.splitn(3, '/');
    let (region, zone, subzone) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let part = |rule: &str, have: &str, optional: bool| {
        rule == "*" || (optional && rule.is_empty()) || rule == have
    };
    part(region, &locality.region, false)
        && part(zone, &locality.zone, true)
        && part(subzone, &locality.subzone, true)
}

/// Locality priority of an endpoint relative to the gateway: lower is preferred.
pub(super) fn priority(ep: &Locality, gw: &Locality, failover: &[(String, String)]) -> u8 {
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

/// Istio's `applyLocalityWeights`: each `to` pattern, in order, claims the localities it
/// matches that no earlier pattern claimed, and shares its percentage between them in
/// proportion to their total endpoint weight.
fn distribute(to: &[(String, u32)], localities: &[&Locality], weights: &[u32]) -> Plan {
    // Distinct localities, in member order.
    let mut distinct: Vec<&Locality> = Vec::new();
    let mut locality_of = Vec::with_capacity(localities.len());
    for l in localities {
        let i = match distinct.iter().position(|d| d == l) {
            Some(i) => i,
            None => {
                distinct.push(l);
                distinct.len() - 1
            }
        };
        locality_of.push(i);
    }
    let mut sum = vec![0u64; distinct.len()];
    for (m, &l) in locality_of.iter().enumerate() {
        sum[l] += weights.get(m).copied().unwrap_or(1).max(1) as u64;
    }
    let mut group_weight = vec![0u64; distinct.len()];
    let mut claimed = vec![false; distinct.len()];
    for (pattern, percent) in to {
        let matched: Vec<usize> = (0..distinct.len())
            .filter(|&l| !claimed[l] && locality_match(distinct[l], pattern))
            .collect();
        let total: u64 = matched.iter().map(|&l| sum[l]).sum();
        for &l in &matched {
            claimed[l] = true;
            // Scaled by 1000 so small shares keep their proportions.
            group_weight[l] = (*percent as u64 * 1000 * sum[l]).div_ceil(total.max(1));
        }
    }
    let group_of = locality_of
        .iter()
        .map(|&l| (claimed[l] && group_weight[l] > 0).then_some(l))
        .collect();
    Plan::Distribute {
        group_of,
        group_weight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LocalityLbSetting, OutlierDetection};

    fn loc(s: &str) -> Locality {
        Locality::parse(s)
    }

    #[test]
    fn priority_order_is_subzone_zone_region_failover_rest() {
        let gw = loc("r1/z1/s1");
        let p = |s: &str| priority(&loc(s), &gw, &[("r1".into(), "r3".into())]);
        assert_eq!(p("r1/z1/s1"), 0);
        assert_eq!(p("r1/z1/s2"), 1);
        assert_eq!(p("r1/z2/s1"), 2);
        assert_eq!(p("r3/z1/s1"), 3);
        assert_eq!(p("r2/z1/s1"), 4);
        // A gateway that does not know its locality prefers nothing.
        assert_eq!(priority(&loc("r2/z1"), &Locality::default(), &[]), 0);
    }

    #[test]
    fn wildcards_match_like_istio() {
        let l = loc("us-west/zone1/sub1");
        assert!(locality_match(&l, "*"));
        assert!(locality_match(&l, "us-west"));
        assert!(locality_match(&l, "us-west/*"));
        assert!(locality_match(&l, "us-west/zone1/*"));
        assert!(locality_match(&l, "us-west/zone1/sub1"));
        assert!(locality_match(&l, "*/zone1"));
        assert!(!locality_match(&l, "us-east/*"));
        assert!(!locality_match(&l, "us-west/zone2/*"));
        assert!(!locality_match(&l, "us-west/zone1/sub2"));
    }

    fn policy(setting: Option<LocalityLbSetting>, outlier: bool) -> TrafficPolicy {
        TrafficPolicy {
            locality_lb: setting,
            outlier: outlier.then(OutlierDetection::default),
            ..Default::default()
        }
    }

    #[test]
    fn mode_follows_istio() {
        let gw = loc("r1/z1/s1");
        let ls = [loc("r1/z1/s1"), loc("r2/z1/s1")];
        let refs: Vec<&Locality> = ls.iter().collect();
        // No outlier detection: priority failover is off.
        assert_eq!(
            Plan::new(&policy(None, false), &gw, &refs, &[1, 1]),
            Plan::Flat
        );
        assert_eq!(
            Plan::new(&policy(None, true), &gw, &refs, &[1, 1]),
            Plan::Priority(vec![0, 4])
        );
        let off = LocalityLbSetting {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(
            Plan::new(&policy(Some(off), true), &gw, &refs, &[1, 1]),
            Plan::Flat
        );
        // distribute applies without outlier detection, when its `from` matches.
        let dist = LocalityLbSetting {
            enabled: true,
            distribute: vec![(
                "r1/z1/*".into(),
                vec![("r1/*".into(), 70), ("r2/*".into(), 30)],
            )],
            failover: vec![],
        };
        assert_eq!(
            Plan::new(&policy(Some(dist.clone()), false), &gw, &refs, &[1, 1]),
            Plan::Distribute {
                group_of: vec![Some(0), Some(1)],
                group_weight: vec![70_000, 30_000],
            }
        );
        let elsewhere = loc("r9/z1/s1");
        assert_eq!(
            Plan::new(&policy(Some(dist), false), &elsewhere, &refs, &[1, 1]),
            Plan::Flat
        );
    }

    #[test]
    fn distribute_shares_a_wildcard_by_endpoint_weight_and_drops_unnamed_localities() {
        let ls = [
            loc("r1/z1/a"),
            loc("r1/z1/b"),
            loc("r1/z1/b"),
            loc("r1/z2/a"),
            loc("r2/z1/a"),
        ];
        let refs: Vec<&Locality> = ls.iter().collect();
        let plan = distribute(
            &[("r1/z1/*".into(), 60), ("r1/*".into(), 40)],
            &refs,
            &[1, 1, 2, 1, 1],
        );
        // r1/z1/a has weight 1 and r1/z1/b weight 3 of the 60; r1/z2 takes the 40 that
        // r1/* has left; r2 is named by no rule and gets nothing.
        assert_eq!(
            plan,
            Plan::Distribute {
                group_of: vec![Some(0), Some(1), Some(1), Some(2), None],
                group_weight: vec![15_000, 45_000, 40_000, 0],
            }
        );
    }
}
