//! What one established ISTIO_MUTUAL connection costs in rustls' heap, by a counting
//! allocator around in-memory connections: strait's own server configuration
//! (`strait::tls::server_config`, client certificate required), a client with the
//! crypto bench's offer (X25519 then P-256, TLS 1.3 and 1.2) and an SVID from the same
//! test CA, a full handshake and one byte each way, as the crypto bench's `idle` row.
//! The server's session cache (256 sessions) is filled first, so that what is counted
//! is per connection. `cargo bench --bench tls_memory`; `BENCH_CONNS` (500).

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use common::{Mesh, mesh_client_config};
use rustls::{ClientConnection, ServerConnection};

/// Live heap bytes and blocks, and the bytes in blocks of 4 KiB or more.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);
static LARGE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

fn count(size: usize, sign: isize) {
    LIVE.fetch_add(sign * size as isize, Relaxed);
    BLOCKS.fetch_add(sign, Relaxed);
    if size >= 4096 {
        LARGE.fetch_add(sign * size as isize, Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size(), 1);
        // SAFETY: the caller's layout, as received.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(l.size(), -1);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count(l.size(), -1);
        count(n, 1);
        // SAFETY: `p` came from `alloc` with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Moves records both ways until neither side has anything to send.
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    while c.wants_write() || s.wants_write() {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("write to a Vec");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("read from a slice");
        }
        s.process_new_packets().expect("server accepts the client");
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("write to a Vec");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("read from a slice");
        }
        c.process_new_packets().expect("client accepts the server");
    }
}

fn connection(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> ServerConnection {
    let name = rustls::pki_types::ServerName::try_from("outbound_.9000_._.echo.bench.local")
        .expect("a DNS name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client connection");
    let mut s = ServerConnection::new(server.clone()).expect("server connection");
    pump(&mut c, &mut s);
    let mut byte = [0u8; 1];
    c.writer().write_all(b"x").expect("client writes");
    pump(&mut c, &mut s);
    s.reader()
        .read_exact(&mut byte)
        .expect("server reads the byte");
    s.writer().write_all(b"x").expect("server writes");
    pump(&mut c, &mut s);
    c.reader()
        .read_exact(&mut byte)
        .expect("client reads the byte");
    s
}

fn main() {
    let n: usize = std::env::var("BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mesh = Mesh::new();
    let id = strait::tls::load_identity(&mesh.gateway).expect("gateway SVID");
    let trust = strait::tls::TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: Vec::new(),
        federated: Default::default(),
    };
    let alpn: Vec<&[u8]> = vec![b"istio"];
    let server = strait::tls::server_config(&id, &trust, &alpn).expect("server configuration");
    let client = mesh_client_config(
        &mesh.bridge,
        &[rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1],
        rustls::DEFAULT_VERSIONS,
        &["istio"],
    )
    .expect("client configuration");
    for _ in 0..300 {
        drop(connection(&server, &client));
    }
    let mut held = Vec::with_capacity(n);
    let (live, blocks, large) = (
        LIVE.load(Relaxed),
        BLOCKS.load(Relaxed),
        LARGE.load(Relaxed),
    );
    for _ in 0..n {
        held.push(connection(&server, &client));
    }
    let per = |now: isize, before: isize| (now - before) as f64 / n as f64;
    let chain: usize = held[0]
        .peer_certificates()
        .map_or(0, |c| c.iter().map(|d| d.len()).sum());
    println!(
        "rustls server connection after one round trip ({} connections, {:?}, {:?}):",
        n,
        held[0].negotiated_cipher_suite().map(|s| s.suite()),
        held[0].negotiated_key_exchange_group().map(|g| g.name()),
    );
    println!(
        "  heap                      {:>6.0} B in {:.1} blocks",
        per(LIVE.load(Relaxed), live),
        per(BLOCKS.load(Relaxed), blocks)
    );
    println!(
        "    in blocks of 4 KiB+     {:>6.0} B (the record read buffer)",
        per(LARGE.load(Relaxed), large)
    );
    println!("    the client's chain      {chain:>6} B of DER");
    println!(
        "  inline (in its task)      {:>6} B (ServerConnection)",
        std::mem::size_of::<ServerConnection>()
    );
    drop(held);
}
