//! Device authentication (DESIGN.md §5): a JWT whose `sub` is the user, checked with a pinned
//! algorithm, a required `exp`, `nbf` and `iat` when present (with a small leeway for clock
//! skew), and `aud`/`iss` when configured. The device comes from the `device` claim or the
//! query.

use std::fmt;
use std::time::Duration;

use gapless_shared::config::Secret;
use gapless_shared::ids::UserId;
use gapless_shared::token::Claims;
use gapless_shared::token::MIN_HS256_SECRET;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// The key tokens are checked with.
#[derive(Clone)]
pub enum JwtKey {
    /// Shared HS256 secret.
    Hs256(Secret),
    /// PEM of an RSA (RS256) or EC P-256 (ES256) public key.
    PublicPem(Vec<u8>),
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKey::Hs256(_) => f.write_str("Hs256(\"***\")"),
            JwtKey::PublicPem(_) => f.write_str("PublicPem(..)"),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the header or the query.
    #[error("no token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    /// The token is malformed, forged, expired or signed with another algorithm.
    #[error("{}", describe(.0))]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// `sub` is not a valid user id.
    #[error("invalid token: `sub` is not a valid user id: {0}")]
    BadSubject(gapless_shared::ids::IdError),
    /// The device id is not valid.
    #[error("invalid device id: {0}")]
    BadDevice(gapless_shared::ids::IdError),
    /// The configured public key is not an RSA or EC PEM.
    #[error("the public key is neither an RSA nor an EC PEM key")]
    BadKey,
    /// The configured HS256 secret is too short to resist guessing.
    #[error(
        "the HS256 secret is {0} bytes; it must be at least {MIN_HS256_SECRET} (generate one with \
         `openssl rand -hex 32`)"
    )]
    WeakSecret(usize),
    /// `iat` lies in the future beyond the leeway.
    #[error("invalid token: issued in the future (`iat`)")]
    IssuedInFuture,
}

/// What a person can act on, for a token `jsonwebtoken` refused (its own `Display` prints
/// enum names such as `InvalidToken`).
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => {
            "token expired: mint a new one (`exp` is in the past)".into()
        }
        ErrorKind::ImmatureSignature => "token not valid yet (`nbf` is in the future)".into(),
        ErrorKind::InvalidSignature => {
            "bad signature: the token was not signed with this edge's key".into()
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => {
            "token signed with another algorithm than the one this edge's key pins".into()
        }
        ErrorKind::InvalidAudience => "token for another audience (`aud`)".into(),
        ErrorKind::InvalidIssuer => "token from another issuer (`iss`)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("token lacks the `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => {
            format!("token's `{claim}` claim has the wrong type")
        }
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "malformed token: not a JWT (three base64url parts joined by dots)".into()
        }
        // serde's words name the field: "missing field `sub`", "invalid type: …".
        ErrorKind::Json(e) => {
            format!(
                "malformed token: its header or claims are not what a gapless token holds ({e})"
            )
        }
        _ => "invalid token".into(),
    }
}

/// Claim checks beyond the signature and `exp`.
#[derive(Debug, Clone)]
pub struct TokenRules {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// `aud` required to contain this value, when set.
    pub audience: Option<String>,
    /// `iss` required to equal this value, when set.
    pub issuer: Option<String>,
}

impl Default for TokenRules {
    fn default() -> Self {
        Self {
            leeway: Duration::from_secs(5),
            audience: None,
            issuer: None,
        }
    }
}

/// Checks tokens with one pinned algorithm.
pub struct Verifier {
    /// The configured key.
    key: DecodingKey,
    /// One pinned algorithm, `exp` and `sub` required, `nbf` checked, `aud`/`iss` when set.
    validation: Validation,
    /// Tolerated clock skew, seconds (for `iat`, which `jsonwebtoken` does not check).
    leeway_s: u64,
}

impl Verifier {
    /// A verifier for `key` with the default [`TokenRules`].
    pub fn new(key: &JwtKey) -> Result<Self, AuthError> {
        Self::with_rules(key, &TokenRules::default())
    }

    /// A verifier for `key`; the algorithm follows from the key type and nothing else.
    pub fn with_rules(key: &JwtKey, rules: &TokenRules) -> Result<Self, AuthError> {
        let (key, algorithm) = match key {
            JwtKey::Hs256(secret) => {
                let len = secret.expose().len();
                if len < MIN_HS256_SECRET {
                    return Err(AuthError::WeakSecret(len));
                }
                (
                    DecodingKey::from_secret(secret.expose().as_bytes()),
                    Algorithm::HS256,
                )
            }
            JwtKey::PublicPem(pem) => {
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (k, Algorithm::RS256)
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (k, Algorithm::ES256)
                } else {
                    return Err(AuthError::BadKey);
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp", "sub"];
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = rules.leeway.as_secs();
        match &rules.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &rules.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            key,
            validation,
            leeway_s: rules.leeway.as_secs(),
        })
    }

    /// The user and the device claim of a valid token.
    pub fn verify(&self, token: &str) -> Result<(UserId, Option<String>), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        if data
            .claims
            .iat
            .is_some_and(|iat| iat > gapless_shared::now_ms() / 1000 + self.leeway_s)
        {
            return Err(AuthError::IssuedInFuture);
        }
        let user = UserId::parse(&data.claims.sub).map_err(AuthError::BadSubject)?;
        Ok((user, data.claims.device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gapless_shared::token::mint_hs256;
    use jsonwebtoken::{EncodingKey, Header};
    use std::time::Duration;

    const K: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::new(&JwtKey::Hs256(Secret::new(K))).expect("valid key")
    }

    fn sign(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(K.as_bytes()),
        )
        .expect("sign")
    }

    #[test]
    fn accepts_a_valid_token() {
        let t = mint_hs256(K, "alice", Some("phone"), Duration::from_secs(60));
        let (user, device) = verifier().verify(&t).expect("valid");
        assert_eq!(user.as_str(), "alice");
        assert_eq!(device.as_deref(), Some("phone"));
    }

    #[test]
    fn refuses_forged_expired_and_unsigned_tokens() {
        let v = verifier();
        let forged = mint_hs256(
            "another-secret-of-32-bytes-at-least",
            "alice",
            None,
            Duration::from_secs(60),
        );
        // Each refusal says, in words a person can act on, what is wrong.
        let said = |token: &str| v.verify(token).expect_err("refused").to_string();
        assert!(
            said(&forged).starts_with("bad signature"),
            "{}",
            said(&forged)
        );
        let now = gapless_shared::now_ms() / 1000;
        let expired = sign(&serde_json::json!({"sub": "alice", "exp": now - 10}));
        assert!(
            said(&expired).starts_with("token expired"),
            "{}",
            said(&expired)
        );
        assert!(said("not a token").starts_with("malformed token"));
        let no_sub = sign(&serde_json::json!({"exp": now + 60}));
        assert!(said(&no_sub).contains("`sub`"), "{}", said(&no_sub));
        // alg: none, hand-made: header {"alg":"none","typ":"JWT"}.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64url(br#"{"sub":"alice","exp":99999999999}"#)
        );
        assert!(v.verify(&none).is_err());
        let bad_sub = mint_hs256(K, "a b", None, Duration::from_secs(60));
        assert!(matches!(v.verify(&bad_sub), Err(AuthError::BadSubject(_))));
    }

    #[test]
    fn nbf_and_iat_are_checked_with_a_small_leeway() {
        let v = verifier();
        let now = gapless_shared::now_ms() / 1000;
        let at = |nbf: u64, iat: u64| {
            sign(&serde_json::json!({"sub": "alice", "exp": now + 600, "nbf": nbf, "iat": iat}))
        };
        assert!(v.verify(&at(now, now)).is_ok());
        assert!(v.verify(&at(now + 2, now + 2)).is_ok(), "within the leeway");
        let early = v.verify(&at(now + 120, now)).expect_err("not yet valid");
        assert!(early.to_string().contains("not valid yet"), "{early}");
        assert!(matches!(
            v.verify(&at(now, now + 120)),
            Err(AuthError::IssuedInFuture)
        ));
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let rules = TokenRules {
            audience: Some("gapless".into()),
            issuer: Some("https://auth.example".into()),
            ..TokenRules::default()
        };
        let v = Verifier::with_rules(&JwtKey::Hs256(Secret::new(K)), &rules).expect("key");
        let exp = gapless_shared::now_ms() / 1000 + 600;
        let good = sign(&serde_json::json!({
            "sub": "alice", "exp": exp, "aud": "gapless", "iss": "https://auth.example"
        }));
        assert!(v.verify(&good).is_ok());
        for bad in [
            serde_json::json!({"sub": "alice", "exp": exp, "iss": "https://auth.example"}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": "other", "iss": "https://auth.example"}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": "gapless", "iss": "https://evil"}),
        ] {
            assert!(v.verify(&sign(&bad)).is_err(), "{bad}");
        }
        // Unconfigured, a token's `aud` is not held against it.
        let with_aud = sign(&serde_json::json!({"sub": "alice", "exp": exp, "aud": "x"}));
        assert!(verifier().verify(&with_aud).is_ok());
    }

    #[test]
    fn short_hs256_secrets_are_refused() {
        let err = Verifier::new(&JwtKey::Hs256(Secret::new("k"))).err();
        assert!(matches!(err, Some(AuthError::WeakSecret(1))), "{err:?}");
        assert!(err.expect("an error").to_string().contains("at least 32"));
    }

    /// Runs the openssl CLI (keys for the public-key tests are made fresh each run).
    fn openssl(args: &[&str]) {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl CLI is installed (scripts/test.sh installs it)");
        assert!(status.success(), "openssl {args:?} failed");
    }

    #[test]
    fn public_keys_verify_their_own_algorithm_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("gapless-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &path("ec.pem"),
        ]);
        openssl(&[
            "pkey",
            "-in",
            &path("ec.pem"),
            "-pubout",
            "-out",
            &path("ec.pub"),
        ]);
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &path("rsa.pem"),
        ]);
        openssl(&[
            "pkey",
            "-in",
            &path("rsa.pem"),
            "-pubout",
            "-out",
            &path("rsa.pub"),
        ]);
        let read = |name: &str| std::fs::read(dir.join(name)).expect("key file");
        let claims = Claims {
            sub: "alice".into(),
            exp: gapless_shared::now_ms() / 1000 + 60,
            device: None,
            nbf: None,
            iat: None,
        };
        let sign = |alg: Algorithm, key: &EncodingKey| {
            jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
        };
        let es = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(&read("ec.pem")).expect("EC key"),
        );
        let rs = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(&read("rsa.pem")).expect("RSA key"),
        );
        let ec = Verifier::new(&JwtKey::PublicPem(read("ec.pub"))).expect("EC public key");
        let rsa = Verifier::new(&JwtKey::PublicPem(read("rsa.pub"))).expect("RSA public key");
        assert_eq!(ec.verify(&es).expect("ES256 verifies").0.as_str(), "alice");
        assert_eq!(rsa.verify(&rs).expect("RS256 verifies").0.as_str(), "alice");
        assert!(ec.verify(&rs).is_err(), "RS256 token against the EC key");
        assert!(rsa.verify(&es).is_err(), "ES256 token against the RSA key");
        // Algorithm confusion: HS256 signed with the public key's PEM as the secret.
        for public in ["ec.pub", "rsa.pub"] {
            let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(&read(public)));
            assert!(ec.verify(&forged).is_err() && rsa.verify(&forged).is_err());
        }
        assert!(matches!(
            Verifier::new(&JwtKey::PublicPem(b"not a key".to_vec())),
            Err(AuthError::BadKey)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn base64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
