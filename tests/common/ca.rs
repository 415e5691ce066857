//! A fake Istio CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`, served by
//! [`super::xds::FakeIstiod`] on the same TLS port as ADS (as istiod serves both on
//! 15012), signing with the same root that signs the fake istiod's own certificate.
//!
//! Like istiod, it authenticates the bearer token and issues the identity it knows the
//! caller by, not whatever the CSR asks for. A test can make it misbehave: answer with
//! another identity, an expired certificate, a chain from an unknown root, or a refusal.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::codegen::http;
use tonic::{Request, Response, Status};

// The messages are strait's own (`strait::identity::svid`): one definition of Istio's CA API.
use strait::identity::svid::{
    CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse,
};

/// How the fake CA answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaAnswer {
    /// A certificate for the configured identity, signed by the mesh root.
    Good,
    /// A good certificate for `spiffe://cluster.local/ns/default/sa/intruder`.
    WrongIdentity,
    /// A certificate for the right identity that expired an hour ago.
    Expired,
    /// The right identity, signed by a root nobody trusts (sent along in the chain).
    Untrusted,
    /// `Unavailable`.
    Refuse,
    /// A good certificate signed by the mesh root, but the chain ends with another root:
    /// the CA's root and the gateway's root file disagree (a rotation half done).
    ForeignRoot,
}

/// One CreateCertificate call.
#[derive(Debug, Clone)]
pub struct CaRequest {
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    /// URI SANs of the CSR.
    pub csr_uris: Vec<String>,
    pub validity_duration: i64,
    pub answer: CaAnswer,
    pub at: Instant,
}

struct State {
    identity: String,
    answer: CaAnswer,
    /// Overrides the requested lifetime.
    ttl: Option<Duration>,
    token: Option<String>,
    /// Token → identity, when callers differ (istiod learns the identity from the token).
    by_token: Vec<(String, String)>,
    mesh: Option<Arc<super::TestCa>>,
    requests: Vec<CaRequest>,
}

/// A handle on the fake CA; clones share it.
#[derive(Clone)]
pub struct FakeCa {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeCa")
    }
}

impl FakeCa {
    /// A CA that issues `identity` to callers presenting the fake istiod's token.
    pub fn new(identity: &str) -> FakeCa {
        FakeCa {
            state: Arc::new(Mutex::new(State {
                identity: identity.to_string(),
                answer: CaAnswer::Good,
                ttl: None,
                token: None,
                by_token: Vec::new(),
                mesh: None,
                requests: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the fake istiod: the root it signs with and the token it accepts.
    pub(crate) fn attach(&self, mesh: Arc<super::TestCa>, token: Option<String>) {
        let mut s = self.lock();
        s.mesh = Some(mesh);
        s.token = token;
    }

    /// A CA for several callers: each token stands for one identity.
    pub fn for_tokens(pairs: &[(&str, &str)]) -> FakeCa {
        let ca = FakeCa::new("");
        ca.lock().by_token = pairs
            .iter()
            .map(|(t, i)| (t.to_string(), i.to_string()))
            .collect();
        ca
    }

    pub fn set_answer(&self, answer: CaAnswer) {
        self.lock().answer = answer;
    }

    /// Issue certificates valid for `ttl`, whatever the caller asks.
    pub fn set_ttl(&self, ttl: Duration) {
        self.lock().ttl = Some(ttl);
    }

    pub fn requests(&self) -> Vec<CaRequest> {
        self.lock().requests.clone()
    }

    /// Polls until at least `n` requests arrived.
    pub async fn wait_requests(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.lock().requests.len() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn create(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .map(|v| v.to_str().unwrap_or("<not ascii>").to_string())
        };
        let authorization = header("authorization");
        let cluster_id = header("clusterid");
        let body = req.get_ref();
        let csr = CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let csr_uris = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_string()),
                _ => None,
            })
            .collect();
        let mut s = self.lock();
        let answer = s.answer;
        s.requests.push(CaRequest {
            authorization: authorization.clone(),
            cluster_id,
            csr_uris,
            validity_duration: body.validity_duration,
            answer,
            at: Instant::now(),
        });
        let caller = if s.by_token.is_empty() {
            if let Some(token) = &s.token
                && authorization.as_deref() != Some(format!("Bearer {token}").as_str())
            {
                return Err(Status::unauthenticated("request authenticate failure"));
            }
            s.identity.clone()
        } else {
            match s
                .by_token
                .iter()
                .find(|(t, _)| authorization.as_deref() == Some(format!("Bearer {t}").as_str()))
            {
                Some((_, id)) => id.clone(),
                None => return Err(Status::unauthenticated("request authenticate failure")),
            }
        };
        let Some(mesh) = s.mesh.clone() else {
            return Err(Status::internal(
                "fake CA has no root (is the fake istiod on TLS?)",
            ));
        };
        // As istiod: a lifetime asked for, else the default (24 h).
        let asked = u64::try_from(body.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let ttl = s.ttl.or(asked).unwrap_or(Duration::from_secs(24 * 3600));
        let identity = match answer {
            CaAnswer::WrongIdentity => "spiffe://cluster.local/ns/default/sa/intruder".to_string(),
            _ => caller,
        };
        drop(s);
        if answer == CaAnswer::Refuse {
            return Err(Status::unavailable("fake CA told to refuse"));
        }
        // As istiod: the SAN is the caller's identity; only the CSR's key is used.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .as_str()
                .try_into()
                .map_err(|_| Status::internal("bad identity"))?,
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = SystemTime::now();
        let (from, to) = match answer {
            CaAnswer::Expired => (
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            ),
            _ => (now - Duration::from_secs(5), now + ttl),
        };
        params.not_before = from.into();
        params.not_after = to.into();
        let csr = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let (leaf, root_pem) = if answer == CaAnswer::Untrusted {
            let other = other_root();
            let leaf = csr
                .signed_by(&other.1)
                .map_err(|e| Status::internal(e.to_string()))?;
            (leaf.pem(), other.0)
        } else {
            let leaf = csr
                .signed_by(&mesh.issuer)
                .map_err(|e| Status::internal(e.to_string()))?;
            let root = if answer == CaAnswer::ForeignRoot {
                other_root().0
            } else {
                mesh.root_pem()
            };
            (leaf.pem(), root)
        };
        // Leaf first, root last, as istiod answers.
        Ok(IstioCertificateResponse {
            cert_chain: vec![leaf, root_pem],
        })
    }
}

/// A root no test trusts, and its issuer.
fn other_root() -> (String, Issuer<'static, KeyPair>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "untrusted root");
    let key = KeyPair::generate().expect("CA key");
    let root = ca.self_signed(&key).expect("CA cert");
    (root.pem(), Issuer::new(ca, key))
}

/// The tonic service for [`FakeCa`], written as generated code would be.
#[derive(Clone)]
pub struct CaService(pub FakeCa);

impl tonic::server::NamedService for CaService {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Unary(FakeCa);

impl tonic::server::UnaryService<IstioCertificateRequest> for Unary {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Result<Response<IstioCertificateResponse>, Status>>;

    fn call(&mut self, req: Request<IstioCertificateRequest>) -> Self::Future {
        let ca = self.0.clone();
        Box::pin(async move { ca.create(req).map(Response::new) })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for CaService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let ca = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != CREATE_CERTIFICATE {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let codec =
                tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(Unary(ca), req).await)
        })
    }
}
