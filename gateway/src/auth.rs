//! JWT bearer authentication, roles, and per-user rate limits.
//!
//! Tokens are standard JWTs any library can mint: `sub` names the user, `exp` is required,
//! `iss` and `aud` are checked when configured, and a `roles` claim (an array, or a
//! space-separated string) grants `admin`. Keys: an HS256 shared secret, RS256 or ES256
//! public keys in PEM, or a JWKS file; a token's `kid` picks among JWKS keys.
//!
//! Keys given as files are read again by [`Auth::reload`]: a rotated key (a changed Secret
//! behind the mounted file) takes effect without a restart. A key file that no longer
//! parses leaves the keys in use as they were. To roll over without rejecting tokens
//! already handed out, publish the new key beside the old one first (a JWKS with both,
//! chosen by `kid`), then drop the old one.
//!
//! One more kind of token is the platform's own: the operator's smoke checks send HS256
//! tokens with `kid` `vellum-smoke`, signed with a key derived from the link key, that act
//! only as the user `vellum:smoke` (see `vellum_core::documents::SMOKE_USER`); a user token
//! naming that subject is refused.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use vellum_core::documents::{Actor, SMOKE_USER};
use vellum_core::signing::SMOKE_KEY_ID;

use crate::AppState;
use crate::error::ApiError;

/// How tokens are checked.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// HS256 shared secret.
    pub secret: Option<Vec<u8>>,
    /// RS256 / ES256 public keys, PEM.
    pub public_keys_pem: Vec<Vec<u8>>,
    /// A JWKS document (JSON).
    pub jwks: Option<String>,
    /// Files the keys are read from, beside the values above, and read again on reload.
    pub files: KeyFiles,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Requests per second allowed to one user, and the burst above it.
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// The key of the operator's smoke-check tokens
    /// ([`smoke_token_key`](vellum_core::signing::smoke_token_key) of the link key).
    pub smoke_key: Option<Vec<u8>>,
}

impl AuthSettings {
    /// Whether any key is given, as a value or a file.
    pub fn has_keys(&self) -> bool {
        self.secret.is_some() || !self.public_keys_pem.is_empty() || self.jwks.is_some() || !self.files.is_empty()
    }
}

/// Key files: an HS256 secret (trailing line breaks ignored), PEM public keys, a JWKS.
#[derive(Clone, Debug, Default)]
pub struct KeyFiles {
    pub secret: Option<PathBuf>,
    pub public_keys: Vec<PathBuf>,
    pub jwks: Option<PathBuf>,
}

impl KeyFiles {
    pub fn is_empty(&self) -> bool {
        self.secret.is_none() && self.public_keys.is_empty() && self.jwks.is_none()
    }

    /// The settings with the files' keys added.
    fn read_into(&self, settings: &AuthSettings) -> Result<AuthSettings, AuthConfigError> {
        let fail =
            |path: &PathBuf, message: String| AuthConfigError::File { path: path.display().to_string(), message };
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| fail(path, e.to_string()));
        let mut out = settings.clone();
        if let Some(path) = &self.secret {
            let mut secret = read(path)?;
            while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                secret.pop();
            }
            if secret.is_empty() {
                return Err(fail(path, "empty".into()));
            }
            out.secret = Some(secret);
        }
        for path in &self.public_keys {
            out.public_keys_pem.push(read(path)?);
        }
        if let Some(path) = &self.jwks {
            let text = String::from_utf8(read(path)?).map_err(|_| fail(path, "not UTF-8".into()))?;
            out.jwks = Some(text);
        }
        Ok(out)
    }
}

/// The keys in use, replaced whole when their files change.
struct KeySet {
    keys: Vec<Key>,
    /// Mints tokens (standalone mode's admin token) when there is an HS256 secret.
    encoding: Option<EncodingKey>,
    /// SHA-256 over what the keys were built from, to tell whether a reload changed them.
    fingerprint: [u8; 32],
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    decoding: DecodingKey,
}

/// The furthest a token's `exp` may be: a token that effectively never expires (`exp` =
/// 2^64-1, say) is refused rather than honoured forever.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// The furthest a smoke-check token's `exp` may be: the operator signs one per check run.
const MAX_SMOKE_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// Whether a token's `exp` (seconds since the epoch) lies further than `limit` from now.
fn expires_beyond(exp: u64, limit: Duration) -> bool {
    exp > unix_now().saturating_add(limit.as_secs())
}

/// Seconds since the epoch, as token claims count time.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The token checker and the per-user limiter.
pub struct Auth {
    keys: RwLock<Arc<KeySet>>,
    /// What the keys are read from again on reload, and the claims required.
    settings: AuthSettings,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Verifies the operator's smoke-check tokens.
    smoke: Option<DecodingKey>,
    /// Where token checks are counted, by outcome, once the metrics exist.
    attempts: std::sync::OnceLock<crate::metrics::Outcomes>,
    /// Tokens verified lately, so that a client's next request with the same token skips
    /// the signature check (see [`Verified`]).
    verified: moka::sync::Cache<Arc<str>, Verified>,
}

/// A token whose signature and claims were checked, as remembered: valid again for as long
/// as the keys it was checked with are the keys in use and its time window (`nbf`, `exp`,
/// with the leeway) holds. Nothing else in a check depends on anything but the token's
/// bytes, which are the memo's key.
#[derive(Clone, Debug)]
struct Verified {
    actor: Actor,
    /// The fingerprint of the key set that verified it.
    keys: [u8; 32],
    nbf: Option<u64>,
    exp: u64,
}

/// Seconds a token's `exp` and `nbf` are stretched by, for clocks slightly apart.
const LEEWAY: u64 = 30;
/// The bytes of verified tokens remembered at most, and how long an unused one is kept.
const VERIFIED_BYTES: u64 = 4 << 20;
const VERIFIED_IDLE: Duration = Duration::from_secs(300);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.key_set().keys.len())
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

/// The claims Vellum reads.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default)]
    pub roles: Roles,
    /// Not before (seconds since the epoch), when the token has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// `roles` as an array or as a space-separated string (OAuth `scope` style).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(untagged)]
pub enum Roles {
    #[default]
    None,
    List(Vec<String>),
    Spaced(String),
}

impl Roles {
    fn contains(&self, role: &str) -> bool {
        match self {
            Roles::None => false,
            Roles::List(list) => list.iter().any(|r| r == role),
            Roles::Spaced(s) => s.split_whitespace().any(|r| r == role),
        }
    }
}

/// Why the auth settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("no way to check tokens: give a JWT secret, a public key or a JWKS file")]
    NoKeys,
    #[error("public key {index}: {message}")]
    PublicKey { index: usize, message: String },
    #[error("JWKS: {0}")]
    Jwks(String),
    #[error("key file {path}: {message}")]
    File { path: String, message: String },
    #[error("the rate limit must be at least 1 request per second")]
    RateLimit,
}

/// The token of an `Authorization` value in the bearer scheme (`Bearer <token>`).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))
}

/// The keys the settings (with their files read) give.
fn key_set(settings: &AuthSettings) -> Result<KeySet, AuthConfigError> {
    use sha2::{Digest, Sha256};
    let mut keys = Vec::new();
    if let Some(secret) = &settings.secret {
        keys.push(Key { kid: None, algorithm: Algorithm::HS256, decoding: DecodingKey::from_secret(secret) });
    }
    for (index, pem) in settings.public_keys_pem.iter().enumerate() {
        // An RSA key verifies RS256; anything else must be an EC key for ES256.
        let (algorithm, key) = match DecodingKey::from_rsa_pem(pem) {
            Ok(key) => (Algorithm::RS256, Ok(key)),
            Err(_) => (Algorithm::ES256, DecodingKey::from_ec_pem(pem)),
        };
        let key = key.map_err(|e| AuthConfigError::PublicKey { index, message: e.to_string() })?;
        keys.push(Key { kid: None, algorithm, decoding: key });
    }
    if let Some(jwks) = &settings.jwks {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| AuthConfigError::Jwks(e.to_string()))?;
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthConfigError::Jwks(e.to_string()))?;
            let algorithm = match jwk.common.key_algorithm.map(|a| a.to_string()).as_deref() {
                Some("ES256") => Algorithm::ES256,
                Some("RS256") | None if matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::RSA(_)) => {
                    Algorithm::RS256
                }
                None if matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)) => {
                    Algorithm::ES256
                }
                other => {
                    return Err(AuthConfigError::Jwks(format!(
                        "key {:?} has algorithm {other:?}; RS256 and ES256 are supported",
                        jwk.common.key_id
                    )));
                }
            };
            keys.push(Key { kid: jwk.common.key_id.clone(), algorithm, decoding: key });
        }
    }
    if keys.is_empty() {
        return Err(AuthConfigError::NoKeys);
    }
    let mut hasher = Sha256::new();
    for part in settings.secret.iter().chain(&settings.public_keys_pem) {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(settings.jwks.as_deref().unwrap_or_default());
    Ok(KeySet {
        keys,
        encoding: settings.secret.as_deref().map(EncodingKey::from_secret),
        fingerprint: hasher.finalize().into(),
    })
}

impl Auth {
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthConfigError> {
        let keys = key_set(&settings.files.read_into(settings)?)?;
        let limiter = if settings.rate_per_second == 0 {
            None
        } else {
            let rate = NonZeroU32::new(settings.rate_per_second).ok_or(AuthConfigError::RateLimit)?;
            let burst =
                NonZeroU32::new(settings.rate_burst.max(settings.rate_per_second)).ok_or(AuthConfigError::RateLimit)?;
            Some(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
        };
        let smoke = settings.smoke_key.as_deref().map(DecodingKey::from_secret);
        Ok(Self {
            keys: RwLock::new(Arc::new(keys)),
            settings: settings.clone(),
            limiter,
            smoke,
            attempts: std::sync::OnceLock::new(),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_BYTES)
                .weigher(|token: &Arc<str>, _: &Verified| u32::try_from(token.len()).unwrap_or(u32::MAX))
                .time_to_idle(VERIFIED_IDLE)
                .build(),
        })
    }

    fn key_set(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether keys come from files that [`reload`](Self::reload) reads again.
    pub fn reloads(&self) -> bool {
        !self.settings.files.is_empty()
    }

    /// Reads the key files again and uses what they hold from now on: `Ok(true)` when the
    /// keys changed. When a file cannot be read or parsed the keys in use stay.
    pub fn reload(&self) -> Result<bool, AuthConfigError> {
        if !self.reloads() {
            return Ok(false);
        }
        let fresh = key_set(&self.settings.files.read_into(&self.settings)?)?;
        let mut keys = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.fingerprint == fresh.fingerprint {
            return Ok(false);
        }
        *keys = Arc::new(fresh);
        Ok(true)
    }

    /// Checks a bearer token and returns who it names. A token longer than
    /// [`MAX_TOKEN_BYTES`](crate::limits::MAX_TOKEN_BYTES) is refused unread.
    pub fn verify(&self, token: &str) -> Result<Actor, String> {
        let checked = self.check(token);
        if let Some(attempts) = self.attempts.get() {
            crate::metrics::SeedMetrics::count(attempts, checked.is_ok());
        }
        checked
    }

    /// Counts every token check from now on in `attempts`, by outcome.
    pub fn count_in(&self, attempts: crate::metrics::Outcomes) {
        self.attempts.set(attempts).ok();
    }

    fn check(&self, token: &str) -> Result<Actor, String> {
        if token.len() > crate::limits::MAX_TOKEN_BYTES {
            return Err(format!("the token is longer than {} bytes", crate::limits::MAX_TOKEN_BYTES));
        }
        let set = self.key_set();
        if let Some(actor) = self.remembered(token, &set, unix_now()) {
            return Ok(actor);
        }
        let (actor, claims) = self.check_signed(token, &set)?;
        let verified = Verified { actor: actor.clone(), keys: set.fingerprint, nbf: claims.nbf, exp: claims.exp };
        self.verified.insert(Arc::from(token), verified);
        Ok(actor)
    }

    /// Who `token` names, when it was verified lately with the keys of `set` and is still
    /// within its time window at `now` (seconds since the epoch).
    fn remembered(&self, token: &str, set: &KeySet, now: u64) -> Option<Actor> {
        let verified = self.verified.get(token)?;
        let current = verified.keys == set.fingerprint
            && verified.exp.saturating_add(LEEWAY) >= now
            && verified.nbf.is_none_or(|nbf| nbf <= now.saturating_add(LEEWAY));
        if !current {
            // Checked again in full, for the precise reason it fails.
            self.verified.invalidate(token);
            return None;
        }
        Some(verified.actor)
    }

    /// Checks `token`'s signature with the keys of `set`, and its claims.
    fn check_signed(&self, token: &str, set: &KeySet) -> Result<(Actor, Claims), String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "the token is not a JWT".to_owned())?;
        if header.kid.as_deref() == Some(SMOKE_KEY_ID) {
            return self.verify_smoke(token, header.alg);
        }
        let candidates: Vec<&Key> = set
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid))
            .collect();
        if candidates.is_empty() {
            return Err(format!("tokens signed with {:?} are not accepted here", header.alg));
        }
        let mut last = String::new();
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = LEEWAY;
            // RFC 7519 §4.1.5: a token is not accepted before its nbf (when it has one).
            validation.validate_nbf = true;
            let mut required = vec!["exp", "sub"];
            required.extend(self.settings.issuer.as_ref().map(|_| "iss"));
            required.extend(self.settings.audience.as_ref().map(|_| "aud"));
            validation.set_required_spec_claims(&required);
            match &self.settings.issuer {
                Some(iss) => validation.set_issuer(&[iss]),
                None => validation.iss = None,
            }
            match &self.settings.audience {
                Some(aud) => validation.set_audience(&[aud]),
                None => validation.validate_aud = false,
            }
            match jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation) {
                Ok(data) => {
                    if data.claims.sub.is_empty() {
                        return Err("the token's sub claim is empty".into());
                    }
                    if data.claims.sub == SMOKE_USER {
                        return Err(format!("the subject {SMOKE_USER} is reserved for the platform's smoke checks"));
                    }
                    if expires_beyond(data.claims.exp, MAX_TOKEN_LIFETIME) {
                        return Err("the token's exp claim is more than ten years away".into());
                    }
                    let admin = data.claims.roles.contains("admin");
                    return Ok((Actor { user: data.claims.sub.clone(), admin }, data.claims));
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => "the token has expired".into(),
                        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
                        ErrorKind::InvalidIssuer => "the token's issuer is not accepted".into(),
                        ErrorKind::InvalidAudience => "the token's audience is not accepted".into(),
                        ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
                        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
                        _ => "the token is malformed".into(),
                    };
                }
            }
        }
        Err(last)
    }

    /// Checks a smoke-check token: HS256 under the smoke key, short-lived, naming
    /// [`SMOKE_USER`]. It acts as that user only.
    fn verify_smoke(&self, token: &str, algorithm: Algorithm) -> Result<(Actor, Claims), String> {
        let Some(key) = &self.smoke else { return Err("smoke-check tokens are not accepted here".into()) };
        if algorithm != Algorithm::HS256 {
            return Err(format!("smoke-check tokens are HS256, not {algorithm:?}"));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        validation.sub = Some(SMOKE_USER.to_owned());
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => "the smoke-check token has expired".to_owned(),
                ErrorKind::InvalidSubject => format!("a smoke-check token must name {SMOKE_USER}"),
                _ => "the smoke-check token does not verify".to_owned(),
            }
        })?;
        if expires_beyond(data.claims.exp, MAX_SMOKE_TOKEN_LIFETIME) {
            return Err("a smoke-check token lives ten minutes at most".into());
        }
        Ok((Actor::smoke(), data.claims))
    }

    /// Mints an HS256 token (standalone mode's admin token, and tests).
    pub fn mint(&self, sub: &str, roles: &[&str], valid_for: Duration) -> Option<String> {
        let set = self.key_set();
        let key = set.encoding.as_ref()?;
        let exp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() + valid_for.as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            exp,
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
            roles: Roles::List(roles.iter().map(|r| (*r).to_owned()).collect()),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).ok()
    }

    /// Forgets the users whose budget is whole again, so that the limiter holds only the
    /// users active now rather than every `sub` ever seen.
    pub fn prune(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Users the limiter holds now.
    pub fn limited_users(&self) -> usize {
        self.limiter.as_ref().map_or(0, RateLimiter::len)
    }

    /// Counts a request against the user's limit; the error says how long to wait.
    pub fn admit(&self, user: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&user.to_owned()).map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The authenticated caller, as a handler argument: 401 without a valid token, 429 over
/// the user's rate limit.
#[derive(Clone, Debug)]
pub struct User(pub Actor);

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let unauthorized = |message: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, message).with_header(
                header::WWW_AUTHENTICATE,
                &format!("Bearer realm=\"vellum\", error=\"invalid_token\", error_description=\"{message}\""),
            )
        };
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "a bearer token is required")
                .with_header(header::WWW_AUTHENTICATE, "Bearer realm=\"vellum\""));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(bearer)
            .ok_or_else(|| unauthorized("the Authorization header is not a bearer token"))?;
        // (A failure counts against the caller's address: `limits::guard`.)
        let actor = state.auth.verify(token.trim()).map_err(|m| unauthorized(&m))?;
        if let Err(wait) = state.auth.admit(&actor.user) {
            let seconds = wait.as_secs_f64().ceil().max(1.0);
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded for this user")
                .with_header(header::RETRY_AFTER, &format!("{seconds:.0}")));
        }
        Ok(User(actor))
    }
}

/// An authenticated caller holding the admin role: 403 otherwise.
#[derive(Clone, Debug)]
pub struct Admin(pub Actor);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let User(actor) = User::from_request_parts(parts, state).await?;
        if !actor.admin {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "this needs the admin role"));
        }
        Ok(Admin(actor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&AuthSettings { secret: Some(b"s3cret".to_vec()), rate_per_second: 0, ..AuthSettings::default() })
            .unwrap()
    }

    #[test]
    fn minted_tokens_verify_with_their_roles() {
        let auth = auth();
        let token = auth.mint("alice", &["user", "admin"], Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token), Ok(Actor { user: "alice".into(), admin: true }));
        let token = auth.mint("bob", &["user"], Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token), Ok(Actor { user: "bob".into(), admin: false }));
    }

    #[test]
    fn forged_expired_and_garbage_tokens_fail_with_reasons() {
        let auth = auth();
        let other = Auth::new(&AuthSettings { secret: Some(b"other".to_vec()), ..AuthSettings::default() }).unwrap();
        let forged = other.mint("alice", &["admin"], Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&forged), Err("the token's signature does not verify".into()));
        let claims = Claims { sub: "a".into(), exp: 1_000_000, iss: None, aud: None, roles: Roles::None, nbf: None };
        let expired = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"s3cret")).unwrap();
        assert_eq!(auth.verify(&expired), Err("the token has expired".into()));
        assert_eq!(auth.verify("not.a.jwt"), Err("the token is not a JWT".into()));
        assert!(auth.verify("").is_err());
        let forever = Claims { sub: "a".into(), exp: u64::MAX, iss: None, aud: None, roles: Roles::None, nbf: None };
        let forever = jsonwebtoken::encode(&Header::default(), &forever, &EncodingKey::from_secret(b"s3cret")).unwrap();
        assert_eq!(auth.verify(&forever), Err("the token's exp claim is more than ten years away".into()));
        assert!(auth.verify(&"x".repeat(20_000)).unwrap_err().contains("longer than"));
        // A token whose nbf lies ahead (beyond the 30 s leeway) is not valid yet; one whose
        // nbf has passed is.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let with_nbf = |nbf: u64| {
            let claims = serde_json::json!({"sub": "a", "exp": now + 3600, "nbf": nbf});
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"s3cret")).unwrap()
        };
        assert_eq!(auth.verify(&with_nbf(now + 600)), Err("the token is not valid yet".into()));
        assert!(auth.verify(&with_nbf(now - 60)).is_ok());
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let strict = Auth::new(&AuthSettings {
            secret: Some(b"k".to_vec()),
            issuer: Some("https://id.example".into()),
            audience: Some("vellum".into()),
            ..AuthSettings::default()
        })
        .unwrap();
        let loose = Auth::new(&AuthSettings { secret: Some(b"k".to_vec()), ..AuthSettings::default() }).unwrap();
        let token = loose.mint("alice", &[], Duration::from_secs(60)).unwrap();
        assert!(loose.verify(&token).is_ok());
        assert!(strict.verify(&token).is_err(), "no iss/aud claims");
        let good = strict.mint("alice", &[], Duration::from_secs(60)).unwrap();
        assert!(strict.verify(&good).is_ok());
    }

    #[test]
    fn space_separated_roles_count() {
        let claims: Claims = serde_json::from_str(r#"{"sub":"a","exp":1,"roles":"user admin"}"#).unwrap();
        assert!(claims.roles.contains("admin"));
    }

    #[test]
    fn the_rate_limit_is_per_user_and_says_how_long_to_wait() {
        let auth = Auth::new(&AuthSettings {
            secret: Some(b"k".to_vec()),
            rate_per_second: 1,
            rate_burst: 2,
            ..AuthSettings::default()
        })
        .unwrap();
        assert!(auth.admit("alice").is_ok() && auth.admit("alice").is_ok());
        let wait = auth.admit("alice").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(auth.admit("bob").is_ok(), "another user has a bucket of their own");
    }

    #[test]
    fn a_rotated_key_file_takes_effect_on_reload_and_a_broken_one_keeps_the_keys_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-key");
        std::fs::write(&path, "the-first-secret\n").unwrap();
        let files = KeyFiles { secret: Some(path.clone()), ..KeyFiles::default() };
        let auth = Auth::new(&AuthSettings { files, ..AuthSettings::default() }).unwrap();
        assert!(auth.reloads());
        let first = auth.mint("alice", &[], Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&first).is_ok(), "and now remembered as verified");
        let direct =
            Auth::new(&AuthSettings { secret: Some(b"the-first-secret".to_vec()), ..AuthSettings::default() }).unwrap();
        assert!(direct.verify(&first).is_ok(), "the file's trailing line break is not part of the key");
        assert!(!auth.reload().unwrap(), "nothing changed");

        std::fs::write(&path, "the-second-secret").unwrap();
        assert!(auth.reload().unwrap());
        assert_eq!(auth.verify(&first), Err("the token's signature does not verify".into()));
        let second = auth.mint("alice", &[], Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&second).is_ok());

        std::fs::write(&path, "").unwrap();
        assert!(matches!(auth.reload(), Err(AuthConfigError::File { .. })));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(auth.reload(), Err(AuthConfigError::File { .. })));
        assert!(auth.verify(&second).is_ok(), "an unreadable file leaves the keys in use");
        assert!(!self::auth().reloads(), "keys given as values have nothing to reload");
    }

    #[test]
    fn a_remembered_token_holds_only_within_its_time_window() {
        let auth = auth();
        let set = auth.key_set();
        let now = unix_now();
        let token = auth.mint("alice", &["admin"], Duration::from_secs(60)).unwrap();
        assert!(auth.remembered(&token, &set, now).is_none(), "not verified yet");
        assert!(auth.verify(&token).is_ok());
        assert_eq!(auth.remembered(&token, &set, now), Some(Actor { user: "alice".into(), admin: true }));
        assert!(auth.remembered(&token, &set, now + 60 + LEEWAY + 1).is_none(), "expired");
        assert!(auth.remembered(&token, &set, now).is_none(), "forgotten once found expired");

        // Valid from 20 s ahead: accepted now within the leeway, not 20 s earlier.
        let claims = serde_json::json!({"sub": "bob", "exp": now + 3600, "nbf": now + 20});
        let early = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"s3cret")).unwrap();
        assert!(auth.verify(&early).is_ok());
        assert!(auth.remembered(&early, &set, now).is_some());
        assert!(auth.remembered(&early, &set, now - 20).is_none(), "before nbf and its leeway");

        // A token is remembered only with the keys that verified it.
        let other = Auth::new(&AuthSettings { secret: Some(b"other".to_vec()), ..AuthSettings::default() }).unwrap();
        assert!(auth.verify(&token).is_ok());
        assert!(auth.remembered(&token, &other.key_set(), now).is_none());
    }

    #[test]
    fn without_keys_nothing_is_accepted() {
        assert!(matches!(Auth::new(&AuthSettings::default()), Err(AuthConfigError::NoKeys)));
    }
}
