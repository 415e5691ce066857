//! Name resolution for `resolution: DNS` endpoints, cached per endpoint.
//!
//! Names are resolved with the system resolver (`getaddrinfo`, through tokio's blocking
//! pool), so a slow lookup holds up only the connection that needs it, never the accept
//! loop or other connections. `getaddrinfo` reports no TTL, so answers are kept for a
//! fixed time ([`DEFAULT_DNS_TTL`] unless the registry is built with another); Envoy,
//! by contrast, honours record TTLs. Concurrent connections to the same endpoint share
//! one lookup. When a refresh fails, the previous answer keeps being used (as Envoy's
//! strict DNS clusters keep their hosts); a name that never resolved is a failed
//! connect attempt, retried after [`NEGATIVE_TTL`] at most.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// How long a successful answer is used before the name is resolved again.
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(30);
/// How long a failed lookup is remembered before trying again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Answer {
    addrs: Vec<SocketAddr>,
    /// Last lookup error, when the last lookup failed.
    error: Option<String>,
    at: Instant,
}

/// The cached resolution of one `host:port`.
#[derive(Debug)]
pub(super) struct DnsCache {
    ttl: Duration,
    answer: Mutex<Option<Answer>>,
}

impl DnsCache {
    pub(super) fn new(ttl: Duration) -> Self {
        DnsCache {
            ttl,
            answer: Mutex::new(None),
        }
    }

    /// Addresses for `host:port`, from the cache while fresh.
    pub(super) async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        self.resolve_with(host, port, |h, p| async move {
            tokio::net::lookup_host((h.as_str(), p))
                .await
                .map(|a| a.collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// The addresses of the last successful answer, without resolving (empty before the
    /// first lookup, or while one is under way).
    pub(super) fn cached(&self) -> Vec<SocketAddr> {
        self.answer
            .try_lock()
            .ok()
            .and_then(|a| a.as_ref().map(|a| a.addrs.clone()))
            .unwrap_or_default()
    }

    async fn resolve_with<F, Fut>(
        &self,
        host: &str,
        port: u16,
        lookup: F,
    ) -> Result<Vec<SocketAddr>, String>
    where
        F: FnOnce(String, u16) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<SocketAddr>, String>>,
    {
        // Held across the lookup so concurrent callers wait for one answer.
        let mut answer = self.answer.lock().await;
        if let Some(a) = answer.as_ref() {
            let ttl = if a.error.is_some() && a.addrs.is_empty() {
                NEGATIVE_TTL.min(self.ttl)
            } else {
                self.ttl
            };
            if a.at.elapsed() < ttl {
                return answer_result(a, host);
            }
        }
        let fresh = lookup(host.to_string(), port).await;
        let previous = answer.take().map(|a| a.addrs).unwrap_or_default();
        let next = match fresh {
            Ok(addrs) if !addrs.is_empty() => Answer {
                addrs,
                error: None,
                at: Instant::now(),
            },
            Ok(_) => Answer {
                addrs: previous,
                error: Some("no addresses".into()),
                at: Instant::now(),
            },
            Err(e) => Answer {
                addrs: previous,
                error: Some(e),
                at: Instant::now(),
            },
        };
        if let Some(e) = &next.error {
            tracing::warn!(
                host,
                error = %e,
                stale = next.addrs.len(),
                "name resolution failed"
            );
        }
        let out = answer_result(&next, host);
        *answer = Some(next);
        out
    }
}

fn answer_result(a: &Answer, host: &str) -> Result<Vec<SocketAddr>, String> {
    if a.addrs.is_empty() {
        Err(format!(
            "resolve {host}: {}",
            a.error.as_deref().unwrap_or("no addresses")
        ))
    } else {
        Ok(a.addrs.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 80))
    }

    #[tokio::test]
    async fn answers_are_cached_for_the_ttl_then_refreshed() {
        let cache = DnsCache::new(Duration::from_millis(100));
        let calls = Arc::new(AtomicU32::new(0));
        let lookup = |n: u8| {
            let calls = calls.clone();
            move |_h: String, _p: u16| async move {
                calls.fetch_add(1, Ordering::Relaxed);
                Ok(vec![addr(n)])
            }
        };
        assert_eq!(
            cache.resolve_with("h", 80, lookup(1)).await,
            Ok(vec![addr(1)])
        );
        assert_eq!(
            cache.resolve_with("h", 80, lookup(2)).await,
            Ok(vec![addr(1)])
        );
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            cache.resolve_with("h", 80, lookup(2)).await,
            Ok(vec![addr(2)])
        );
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_last_answer_and_a_never_resolved_name_fails() {
        let cache = DnsCache::new(Duration::ZERO);
        let fail = |_h: String, _p: u16| async { Err::<Vec<SocketAddr>, _>("NXDOMAIN".into()) };
        let err = cache.resolve_with("gone.test", 80, fail).await.unwrap_err();
        assert_eq!(err, "resolve gone.test: NXDOMAIN");
        let ok = |_h: String, _p: u16| async { Ok(vec![addr(7)]) };
        assert_eq!(cache.resolve_with("h", 80, ok).await, Ok(vec![addr(7)]));
        assert_eq!(
            cache.resolve_with("h", 80, fail).await,
            Ok(vec![addr(7)]),
            "stale answer used while the name does not resolve"
        );
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system_resolver() {
        let cache = DnsCache::new(DEFAULT_DNS_TTL);
        let addrs = cache.resolve("localhost", 9).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
    }
}
