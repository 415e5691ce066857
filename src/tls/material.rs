//! The gateway's own TLS material: its SVID, the trust configuration, and the rustls
//! configurations built from them. Loaded from files at start and again whenever the
//! files change; a failed reload keeps the previous material.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::certs::{CertError, Identity, cert_not_after, load_identity, load_trust_bundle};
use super::spiffe::SpiffeId;
use super::verify::{
    ClientAuth, TrustConfig, client_config, hbone_server_config, server_config_with,
};
use crate::model::{ISTIO_ALPNS, PeerAuthMode, Snapshot, UpstreamTls};

/// What ISTIO_MUTUAL servers, bridges and mTLS origination use.
pub struct TlsMaterial {
    /// The ISTIO_MUTUAL servers' configuration, negotiating [`SERVER_ALPNS`].
    server: Arc<rustls::ServerConfig>,
    /// The same without ALPN, for a client whose offer matches none of them.
    server_without_alpn: Arc<rustls::ServerConfig>,
    /// The HBONE listener's configuration: TLS 1.3, ALPN `h2`, a client certificate
    /// required whatever PeerAuthentication says (as Istio's ambient gateway).
    pub hbone: Arc<rustls::ServerConfig>,
    /// Client configurations by expected peer identity (`None`: any peer of a trusted domain).
    clients: BTreeMap<Option<String>, Arc<rustls::ClientConfig>>,
    pub spiffe_id: Option<SpiffeId>,
    /// (role, file, expiry) of each certificate in use.
    pub expiries: Vec<(&'static str, PathBuf, SystemTime)>,
    /// The SVID's chain (leaf first) and the mesh roots, for `config_dump`'s secrets.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// When this material was built.
    pub built: SystemTime,
}

/// What an ISTIO_MUTUAL server negotiates, in its order of preference: Istio's own
/// protocols, then those of istiod's gateway chains (`h2`, `http/1.1`), so that a client
/// speaking HTTP over the terminated connection (curl, a gRPC client) gets its protocol.
/// `istio` comes before `istio-peer-exchange`: a sidecar offers both, and the latter
/// would start Istio's in-band metadata exchange, which strait does not speak.
pub const SERVER_ALPNS: [&str; 7] = [
    ISTIO_ALPNS[0],
    ISTIO_ALPNS[1],
    ISTIO_ALPNS[2],
    ISTIO_ALPNS[3],
    ISTIO_ALPNS[4],
    "h2",
    "http/1.1",
];

impl TlsMaterial {
    /// The server configuration for a client offering `offered` (ALPN protocol names).
    /// Where the offer matches none of [`SERVER_ALPNS`], the handshake goes on without
    /// ALPN, as Envoy's does, instead of failing with `no_application_protocol` (what
    /// rustls does with a protocol list configured).
    pub fn server_for(&self, offered: &[Vec<u8>]) -> &Arc<rustls::ServerConfig> {
        let ours = |p: &Vec<u8>| SERVER_ALPNS.iter().any(|a| a.as_bytes() == p.as_slice());
        if offered.is_empty() || offered.iter().any(ours) {
            &self.server
        } else {
            &self.server_without_alpn
        }
    }

    /// The client configuration for an expected peer (built at load for every identity
    /// the configuration names).
    pub fn client(&self, expected: Option<&str>) -> Option<&Arc<rustls::ClientConfig>> {
        self.clients.get(&expected.map(str::to_string))
    }
}

/// Whether the snapshot needs the gateway's own certificates at all (ISTIO_MUTUAL and
/// HBONE servers terminate TLS with them): passthrough alone
/// never terminates TLS, so a pure AUTO_PASSTHROUGH gateway runs without them.
pub fn needed(snapshot: &Snapshot) -> bool {
    let mutual_server = snapshot.listeners.iter().flat_map(|l| &l.servers).any(|s| {
        matches!(
            s.mode,
            crate::model::ServerTlsMode::IstioMutual | crate::model::ServerTlsMode::Hbone
        )
    });
    let originates = snapshot.services.values().any(|s| {
        s.policy.tls == UpstreamTls::IstioMutual
            || s.subsets
                .values()
                .any(|x| x.policy.tls == UpstreamTls::IstioMutual)
    });
    mutual_server || originates || !snapshot.bridges.is_empty()
}

/// Files whose change should reload the material.
pub fn watched_paths(snapshot: &Snapshot) -> Vec<PathBuf> {
    let s = &snapshot.settings;
    let mut v = match &s.cert_source {
        crate::model::CertSource::Files => vec![s.cert_dir.clone()],
        crate::model::CertSource::MeshCa(ca) => vec![ca.server.root_cert.clone()],
    };
    v.extend(s.trust_bundles.values().cloned());
    v
}

/// Loads the SVID and trust bundles named by the snapshot and builds the configurations.
pub fn load(snapshot: &Snapshot) -> Result<TlsMaterial, CertError> {
    let s = &snapshot.settings;
    let identity = load_identity(&s.cert_dir)?;
    build(
        snapshot,
        identity,
        s.cert_dir.join(super::certs::CERT_CHAIN),
        s.cert_dir.join(super::certs::ROOT_CERT),
    )
}

/// Builds the configurations around an SVID held in memory (from the mesh CA), with the
/// mesh roots read from `roots_file`, so a root rotation is picked up at each rebuild.
pub fn build_from_ca(
    snapshot: &Snapshot,
    svid: &Identity,
    ca: &str,
    roots_file: &std::path::Path,
) -> Result<TlsMaterial, CertError> {
    let roots = super::certs::read_certs(roots_file)?;
    let identity = Identity {
        chain: svid.chain.clone(),
        key: svid.key.clone_key(),
        roots,
        spiffe_id: svid.spiffe_id.clone(),
        not_after: svid.not_after,
    };
    build(
        snapshot,
        identity,
        PathBuf::from(format!("mesh CA {ca}")),
        roots_file.to_path_buf(),
    )
}

fn build(
    snapshot: &Snapshot,
    identity: Identity,
    leaf_source: PathBuf,
    root_source: PathBuf,
) -> Result<TlsMaterial, CertError> {
    let s = &snapshot.settings;
    let mut federated = BTreeMap::new();
    for (td, path) in &s.trust_bundles {
        federated.insert(td.clone(), load_trust_bundle(path)?);
    }
    let trust = TrustConfig {
        trust_domain: s.trust_domain.clone(),
        aliases: s.trust_domain_aliases.clone(),
        federated,
    };
    let alpn: Vec<&[u8]> = SERVER_ALPNS.iter().map(|a| a.as_bytes()).collect();
    // PeerAuthentication STRICT (or none) requires a client certificate; PERMISSIVE and
    // DISABLE let a client without one through, unauthenticated.
    let client_auth = match snapshot.peer_authentication {
        Some(PeerAuthMode::Permissive | PeerAuthMode::Disable) => ClientAuth::Optional,
        Some(PeerAuthMode::Strict) | None => ClientAuth::Required,
    };
    let server = server_config_with(&identity, &trust, &alpn, client_auth)?;
    let hbone = hbone_server_config(&identity, &trust)?;
    let mut bare = (*server).clone();
    bare.alpn_protocols.clear();
    let server_without_alpn = Arc::new(bare);
    let mut clients = BTreeMap::new();
    let mut expected: Vec<Option<String>> = vec![None];
    expected.extend(snapshot.bridges.iter().map(|b| b.identity.clone()));
    for e in expected {
        if clients.contains_key(&e) {
            continue;
        }
        let peer = match &e {
            Some(id) => Some(SpiffeId::parse(id).map_err(|err| CertError::Trust {
                what: format!("expected identity {id}"),
                reason: err.to_string(),
            })?),
            None => None,
        };
        let cfg = client_config(&identity, &trust, peer.as_ref(), &[b"istio"])?;
        clients.insert(e, cfg);
    }
    let mut expiries = vec![("leaf", leaf_source, identity.not_after)];
    for root in &identity.roots {
        if let Ok(t) = cert_not_after(root) {
            expiries.push(("root", root_source.clone(), t));
        }
    }
    for (td, path) in &s.trust_bundles {
        if let Some(t) = trust
            .federated
            .get(td)
            .and_then(|certs| certs.iter().filter_map(|c| cert_not_after(c).ok()).min())
        {
            expiries.push(("federated_root", path.clone(), t));
        }
    }
    Ok(TlsMaterial {
        server,
        server_without_alpn,
        hbone,
        clients,
        spiffe_id: identity.spiffe_id,
        expiries,
        chain: identity.chain,
        roots: identity.roots,
        built: SystemTime::now(),
    })
}
