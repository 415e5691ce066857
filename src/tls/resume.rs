//! Where strait's TLS clients (bridges, re-encryption) keep TLS 1.3 session tickets.
//!
//! rustls' own store keeps at most 8 tickets per server name. A bridge or a gateway
//! re-encrypting to a service starts many connections to the same server name at
//! once: each takes a ticket when it sends its ClientHello and brings two back after
//! its handshake, so a burst of more than 8 finds the store empty and pays full
//! handshakes while later tickets overflow and are thrown away (measured: 42 % of a
//! bridge's connections resumed at 32 concurrent connections). This store keeps up to
//! [`PER_NAME`] tickets per name within the same bound on the total that rustls' store
//! has (256 names × 8), so a burst finds a ticket for each of its connections.
//!
//! What it does not change: each ticket is used at most once (as RFC 8446 C.4 advises,
//! and as the trait requires); one store belongs to one client configuration, that is
//! to one client SVID and one expected peer identity, so a session is never resumed
//! under another identity on either side (a new SVID or a reload builds new
//! configurations, and with them empty stores); and rustls itself only resumes a
//! ticket with the verifier and certificate that made it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rustls::NamedGroup;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;

/// Tickets kept per server name.
pub const PER_NAME: usize = 64;
/// Tickets kept in all: rustls' default store bounds itself to 256 names of 8.
pub const TOTAL: usize = 2048;
/// Server names kept (key-exchange hints and TLS 1.2 sessions too).
const NAMES: usize = 256;

/// A [`ClientSessionStore`] with room for bursts of connections to one server name.
#[derive(Debug)]
pub struct TicketStore {
    tickets: Mutex<Tickets>,
    /// Key-exchange hints and TLS 1.2 sessions, as rustls keeps them.
    other: ClientSessionMemoryCache,
}

#[derive(Debug, Default)]
struct Tickets {
    by_name: HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>,
    /// Names by their latest insertion, oldest first: where the total bound takes from.
    order: VecDeque<ServerName<'static>>,
    total: usize,
}

impl Default for TicketStore {
    fn default() -> TicketStore {
        TicketStore::new()
    }
}

impl TicketStore {
    pub fn new() -> TicketStore {
        TicketStore {
            tickets: Mutex::new(Tickets::default()),
            other: ClientSessionMemoryCache::new(NAMES),
        }
    }

    /// Tickets held for `name`.
    #[cfg(test)]
    fn held(&self, name: &ServerName<'static>) -> usize {
        self.lock().by_name.get(name).map_or(0, VecDeque::len)
    }

    /// Tickets held in all.
    #[cfg(test)]
    fn total(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tickets> {
        // The data stays consistent at every step, so a poisoned lock is still usable.
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tickets {
    fn insert(&mut self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        if let Some(at) = self.order.iter().position(|n| *n == name) {
            self.order.remove(at);
        } else if self.by_name.len() >= NAMES
            && let Some(oldest) = self.order.pop_front()
            && let Some(gone) = self.by_name.remove(&oldest)
        {
            self.total -= gone.len();
        }
        self.order.push_back(name.clone());
        let held = self.by_name.entry(name).or_default();
        if held.len() >= PER_NAME {
            held.pop_front();
            self.total -= 1;
        }
        held.push_back(value);
        self.total += 1;
        // Over the total: the oldest tickets of the name inserted into longest ago.
        while self.total > TOTAL {
            let Some(oldest) = self.order.front().cloned() else {
                break;
            };
            let emptied = match self.by_name.get_mut(&oldest) {
                Some(q) => {
                    if q.pop_front().is_some() {
                        self.total -= 1;
                    }
                    q.is_empty()
                }
                None => true,
            };
            if emptied {
                self.by_name.remove(&oldest);
                self.order.pop_front();
            }
        }
    }

    fn take(&mut self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let held = self.by_name.get_mut(name)?;
        // The newest: the likeliest still known to the server.
        let value = held.pop_back()?;
        self.total -= 1;
        Some(value)
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.other.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.other.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.other.set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.other.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.other.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.lock().insert(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.lock().take(server_name)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    use super::*;
    use crate::tls::provider::{client_provider, server_provider};

    /// A server for `*.x.test` that sends `tickets` TLS 1.3 tickets per handshake, and a
    /// client trusting it that keeps its tickets in `store`.
    fn configs(
        tickets: usize,
        store: &Arc<TicketStore>,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["*.x.test".to_string()])
            .expect("rcgen makes a self-signed certificate");
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let mut server = rustls::ServerConfig::builder_with_provider(server_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.send_tls13_tickets = tickets;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(client_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::store(store.clone());
        (Arc::new(server), Arc::new(client))
    }

    /// One connection to `name`, in memory, until the client has read the server's
    /// tickets; returns how the handshake went.
    fn connect(
        server: &Arc<rustls::ServerConfig>,
        client: &Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Option<HandshakeKind> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = ClientConnection::new(client.clone(), name).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind()
    }

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_string()).unwrap()
    }

    #[test]
    fn sessions_resume_and_each_ticket_is_used_once() {
        let store = Arc::new(TicketStore::new());
        let (server, client) = configs(2, &store);
        assert_eq!(
            connect(&server, &client, "a.x.test"),
            Some(HandshakeKind::Full)
        );
        assert_eq!(store.held(&name("a.x.test")), 2);
        assert_eq!(
            connect(&server, &client, "a.x.test"),
            Some(HandshakeKind::Resumed)
        );
        // One taken, two more brought back.
        assert_eq!(store.held(&name("a.x.test")), 3);
        // Another name has no ticket of its own.
        assert_eq!(
            connect(&server, &client, "b.x.test"),
            Some(HandshakeKind::Full)
        );
        assert_eq!(store.total(), 5);
    }

    #[test]
    fn a_burst_finds_more_than_rustls_eight_tickets_per_name() {
        let store = Arc::new(TicketStore::new());
        let (server, client) = configs(PER_NAME + 10, &store);
        connect(&server, &client, "a.x.test");
        assert_eq!(store.held(&name("a.x.test")), PER_NAME);
        assert_eq!(store.total(), PER_NAME);
    }

    #[test]
    fn the_total_is_bounded_by_dropping_the_oldest_names_tickets() {
        let store = Arc::new(TicketStore::new());
        let (server, client) = configs(PER_NAME, &store);
        let names = TOTAL / PER_NAME + 3;
        for i in 0..names {
            connect(&server, &client, &format!("n{i}.x.test"));
        }
        assert_eq!(store.total(), TOTAL);
        for i in 0..3 {
            assert_eq!(store.held(&name(&format!("n{i}.x.test"))), 0, "n{i}");
        }
        assert_eq!(
            store.held(&name(&format!("n{}.x.test", names - 1))),
            PER_NAME
        );
    }
}
