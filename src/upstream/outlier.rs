//! Outlier detection on connect failures, with Envoy's ejection arithmetic.
//!
//! Semantics (a TCP gateway sees no HTTP status, so Istio's `consecutiveErrors`,
//! `consecutive5xxErrors` and `consecutiveGatewayErrors` all count the same thing):
//! - A *failure* is a connect attempt that did not give a working upstream: refused,
//!   timed out, name not resolved, or — when the gateway replays a ClientHello — an
//!   endpoint that accepted and then closed or reset before answering it. Such an
//!   endpoint accepts TCP but serves nobody, so it must not look healthy.
//!   A *success* is a connection the endpoint answered; it resets the count.
//!   What happens later on an established connection (a reset after hours) is the
//!   application's business and is not counted.
//! - Ejection happens at once on the Nth consecutive failure, as Envoy does for its
//!   consecutive-error detectors, and ends exactly when its time is up (Envoy returns
//!   hosts at the next `interval` sweep; here nothing waits for a sweep).
//! - The ejection time is `baseEjectionTime × multiplier`, capped at
//!   max(`baseEjectionTime`, 300 s) (Envoy's `max_ejection_time` default). Each ejection
//!   raises the multiplier by one; every `interval` an endpoint spends un-ejected lowers
//!   it by one, so an endpoint that keeps failing stays out longer and one that recovered
//!   starts over.
//! - `maxEjectionPercent` caps how many members of a cluster may be ejected at once,
//!   but one may always be (Envoy's rule); `minHealthPercent` is applied when picking
//!   (see the balancer).

use std::time::Duration;

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// How long a new ejection lasts and the multiplier it leaves behind.
///
/// `multiplier` is the value after the previous ejection (0 if never ejected) and
/// `healthy_for` how long the endpoint has been back since then.
pub(super) fn next_ejection(
    base: Duration,
    interval: Duration,
    multiplier: u32,
    healthy_for: Duration,
) -> (Duration, u32) {
    let decay = if interval.is_zero() {
        0
    } else {
        (healthy_for.as_millis() / interval.as_millis()).min(u32::MAX as u128) as u32
    };
    let multiplier = multiplier.saturating_sub(decay).saturating_add(1);
    let cap = base.max(MAX_EJECTION);
    let time = base.saturating_mul(multiplier).min(cap);
    (time.max(Duration::from_millis(1)), multiplier)
}

/// Whether ejecting one more member stays within `maxEjectionPercent`.
pub(super) fn may_eject(already_ejected: usize, members: usize, max_percent: u32) -> bool {
    let cap = (members as u64 * max_percent as u64 / 100).max(1);
    (already_ejected as u64) < cap
}

/// Whether the cluster is below `minHealthPercent`, where ejection is ignored.
pub(super) fn panicking(healthy: usize, total: usize, min_health_percent: u32) -> bool {
    min_health_percent > 0 && (healthy as u64) * 100 < total as u64 * min_health_percent as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn repeat_ejections_grow_and_recovery_shrinks_them() {
        let base = 30 * S;
        let interval = 10 * S;
        let (t1, m1) = next_ejection(base, interval, 0, Duration::ZERO);
        assert_eq!((t1, m1), (30 * S, 1));
        // Failing again straight after coming back: twice as long.
        let (t2, m2) = next_ejection(base, interval, m1, S);
        assert_eq!((t2, m2), (60 * S, 2));
        let (t3, m3) = next_ejection(base, interval, m2, Duration::ZERO);
        assert_eq!((t3, m3), (90 * S, 3));
        // Twenty healthy seconds take two steps off.
        assert_eq!(next_ejection(base, interval, m3, 20 * S), (60 * S, 2));
        // Long healthy: back to the base time.
        assert_eq!(next_ejection(base, interval, m3, 3600 * S), (30 * S, 1));
    }

    #[test]
    fn ejection_time_is_capped_like_envoy() {
        assert_eq!(next_ejection(30 * S, 10 * S, 40, Duration::ZERO).0, 300 * S);
        // A base above the cap is still honoured once.
        assert_eq!(next_ejection(600 * S, 10 * S, 3, Duration::ZERO).0, 600 * S);
        assert!(next_ejection(Duration::ZERO, S, 0, Duration::ZERO).0 > Duration::ZERO);
    }

    #[test]
    fn max_ejection_percent_always_allows_one() {
        assert!(may_eject(0, 3, 10));
        assert!(!may_eject(1, 3, 10));
        assert!(may_eject(4, 10, 50));
        assert!(!may_eject(5, 10, 50));
        assert!(may_eject(2, 3, 100));
        assert!(!may_eject(3, 3, 100));
    }

    #[test]
    fn panic_threshold() {
        assert!(!panicking(0, 4, 0), "0 disables panic mode");
        assert!(panicking(1, 4, 50));
        assert!(!panicking(2, 4, 50));
        assert!(panicking(0, 1, 1));
    }
}
