//! Webhook signatures (the Standard Webhooks scheme and the legacy `X-Webhook-Signature`),
//! and the key of the operator's smoke-check tokens.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const WHSEC: &str = "whsec_";

/// The HMAC key a Webhook's Secret value stands for: a `whsec_`-prefixed value is base64
/// of the key, as Standard Webhooks defines; any other non-empty value is the key's bytes.
pub fn parse_signing_key(value: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(value).ok().map(str::trim);
    match text.and_then(|t| t.strip_prefix(WHSEC)) {
        Some(encoded) => match STANDARD.decode(encoded) {
            Ok(key) if !key.is_empty() => Ok(key),
            Ok(_) => Err("the signing key is empty".into()),
            Err(_) => Err("the signing key starts with whsec_ but the rest is not base64".into()),
        },
        None if value.is_empty() => Err("the signing key is empty".into()),
        None => Ok(text.map_or_else(|| value.to_vec(), |t| t.as_bytes().to_vec())),
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    STANDARD.encode(mac.finalize().into_bytes())
}

/// The Standard Webhooks `webhook-signature` value for one key: `v1,<base64 HMAC-SHA256 of
/// "id.timestamp.body">`.
pub fn standard_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    format!("v1,{}", hmac(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]))
}

/// The legacy `X-Webhook-Signature` value: base64 HMAC-SHA256 of the raw body.
pub fn legacy_signature(key: &[u8], body: &[u8]) -> String {
    hmac(key, &[body])
}

/// The `kid` header of the tokens the operator's smoke checks send.
pub const SMOKE_KEY_ID: &str = "vellum-smoke";

/// The HS256 key of smoke-check tokens, derived from the platform's link key, which only the
/// operator and the platform's pods hold: the operator signs with it whatever algorithm
/// users' tokens use, and a token signed with it acts only as
/// [`SMOKE_USER`](crate::documents::SMOKE_USER).
pub fn smoke_token_key(link_key: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(link_key).expect("HMAC takes keys of any length");
    mac.update(b"vellum smoke-check tokens v1");
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example of the Standard Webhooks specification.
        let key = parse_signing_key(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = standard_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn legacy_signature_matches_the_seed_receivers() {
        // The seed receivers' Python snippet gives this for key "secret" and body "{}":
        // base64.b64encode(hmac.new(b"secret", b"{}", hashlib.sha256).digest())
        assert_eq!(legacy_signature(b"secret", b"{}"), "dzJZAsrKgS3CWXM6rNBGtzgXNyx3e42VtAJkdHRRbhM=");
    }

    #[test]
    fn keys_parse_or_fail_clearly() {
        assert_eq!(parse_signing_key(b"plain-secret").unwrap(), b"plain-secret");
        assert!(parse_signing_key(b"whsec_***").unwrap_err().contains("not base64"));
        assert!(parse_signing_key(b"").is_err());
        assert!(parse_signing_key(b"whsec_").is_err());
    }
}
