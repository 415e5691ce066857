//! Projected service-account tokens for the real istiod: an RS256 issuer whose JWKS is
//! served over HTTP on loopback, for istiod's `JWT_RULE` (what a cluster's API server is
//! to istiod: the issuer of the `istio-token` the kubelet mounts in a pod).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "istio-ca";

/// An RSA key (made by `openssl genpkey`) and the JWKS server publishing it.
pub struct TokenIssuer {
    key: Arc<ring::signature::RsaKeyPair>,
    pub jwks_uri: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TokenIssuer {
    /// A new key, its JWKS served at `http://127.0.0.1:<port>/jwks` on the current
    /// runtime (and namespace).
    pub async fn start(dir: &Path) -> TokenIssuer {
        let der = dir.join("jwt-key.der");
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-outform", "DER", "-out"])
            .arg(&der)
            .output()
            .expect("openssl (.ci/run installs it)");
        assert!(out.status.success(), "openssl genpkey: {out:?}");
        // OpenSSL 3.0 writes a DER RSA key as PKCS#1, later ones as PKCS#8.
        let bytes = std::fs::read(&der).unwrap();
        let key = ring::signature::RsaKeyPair::from_pkcs8(&bytes)
            .or_else(|_| ring::signature::RsaKeyPair::from_der(&bytes))
            .expect("an RSA key from openssl");
        let (n, e) = rsa_public_numbers(key.public().as_ref());
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "strait-test",
            "n": B64.encode(n),
            "e": B64.encode(e),
        }]})
        .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let body = jwks.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        TokenIssuer {
            key: Arc::new(key),
            jwks_uri: format!("http://{addr}/jwks"),
            server,
        }
    }

    /// istiod's `JWT_RULE` for this issuer.
    pub fn rule(&self) -> String {
        serde_json::json!({"issuer": ISSUER, "jwks_uri": self.jwks_uri, "audiences": [AUDIENCE]})
            .to_string()
    }

    /// A token shaped like a projected one: `sub` `system:serviceaccount:<ns>:<sa>`,
    /// audience `aud`, expiring `lifetime_s` seconds from now (negative: already expired).
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        aud: &str,
        lifetime_s: i64,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let header = serde_json::json!({"alg": "RS256", "kid": "strait-test", "typ": "JWT"});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [aud],
            "iat": now.min(now + lifetime_s) - 60,
            "nbf": now.min(now + lifetime_s) - 60,
            "exp": now + lifetime_s,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account}},
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("RS256 signature");
        format!("{signing_input}.{}", B64.encode(signature))
    }
}

/// The modulus and exponent of a DER `RSAPublicKey` (`SEQUENCE { n INTEGER, e INTEGER }`),
/// big-endian without leading zeros, as a JWK wants them.
fn rsa_public_numbers(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    // One DER element at `at`: (tag, content, next offset).
    fn element(der: &[u8], at: usize) -> (u8, &[u8], usize) {
        let tag = der[at];
        let first = der[at + 1] as usize;
        let (len, start) = if first < 0x80 {
            (first, at + 2)
        } else {
            let n = first & 0x7f;
            let len = der[at + 2..at + 2 + n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, at + 2 + n)
        };
        (tag, &der[start..start + len], start + len)
    }
    let (tag, seq, _) = element(der, 0);
    assert_eq!(tag, 0x30, "RSAPublicKey is a SEQUENCE");
    let (_, n, next) = element(seq, 0);
    let (_, e, _) = element(seq, next);
    let strip = |v: &[u8]| {
        v.iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    (strip(n), strip(e))
}
