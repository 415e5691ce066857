//! Nanoseconds per parse for the two parsers every passthrough connection goes through:
//! the ClientHello inspector (one record, and the same hello fragmented over three records,
//! which takes the reassembling path) and the Istio subset-key parser.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use strait::route::sni::parse_subset_key;
use strait::tls::client_hello::{HelloParse, parse_client_hello};

/// A ~1.8 KiB rustls ClientHello (the size a post-quantum key share gives), one record.
const ONE_RECORD: &[u8] = include_bytes!("../tests/data/client_hello/rustls_pq_1800.bin");
/// The same ClientHello split over three TLS records.
const THREE_RECORDS: &[u8] = include_bytes!("../tests/data/client_hello/rustls_pq_3_records.bin");
/// A ~300-byte rustls ClientHello as a sidecar without post-quantum key shares sends.
const SMALL: &[u8] = include_bytes!("../tests/data/client_hello/rustls_tls13_istio.bin");

fn sni_of(buf: &[u8]) -> usize {
    match parse_client_hello(buf) {
        HelloParse::Complete(h) => h.sni().map_or(0, str::len) + h.alpn().count(),
        _ => 0,
    }
}

fn client_hello(c: &mut Criterion) {
    // Sanity: every input must parse, or the numbers below measure an error path.
    for buf in [ONE_RECORD, THREE_RECORDS, SMALL] {
        assert!(sni_of(buf) > 0, "bench vector does not parse");
    }
    let mut group = c.benchmark_group("client_hello");
    for (name, buf) in [
        ("rustls_300B_1_record", SMALL),
        ("rustls_1800B_1_record", ONE_RECORD),
        ("rustls_1800B_3_records", THREE_RECORDS),
    ] {
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_function(name, |b| b.iter(|| sni_of(black_box(buf))));
    }
    group.finish();
}

fn subset_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("subset_key");
    for (name, sni) in [
        (
            "no_subset",
            "outbound_.9080_._.reviews.default.svc.cluster.local",
        ),
        (
            "subset",
            "outbound_.9080_.v2_.reviews.default.svc.cluster.local",
        ),
        ("not_a_key", "reviews.default.svc.cluster.local"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| parse_subset_key(black_box(sni)).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, client_hello, subset_key);
criterion_main!(benches);
