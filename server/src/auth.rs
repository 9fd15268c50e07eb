//! HS256 tokens (JWT compact form) naming the documents a client may use and whether it may
//! write. Claims: `{"doc": "<id>" | "<hex prefix>*", "write": bool, "exp": <unix seconds>}`.
//!
//! `mint` is what `pagesync-server token` prints; `verify` is what the server checks on
//! `Hello`. The signature is compared in constant time (`Mac::verify_slice`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use pagesync::protocol::Grant;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// A secret shorter than this is refused: HS256 wants at least 256 bits of key.
pub const MIN_SECRET_BYTES: usize = 32;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

#[derive(Default, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// A document id, or a prefix of hex digits followed by `*`.
    pub doc: String,
    #[serde(default)]
    pub write: bool,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// May read `/metrics`.
    #[serde(default)]
    pub metrics: bool,
    /// May delete documents (`DELETE /v1/docs/{id}`) among those `doc` names.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// Who the token is for (a user id, a name): shown to the other clients of a document in
    /// presence, as their peer's `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Mutators it may call (`token --call add_todo,toggle`, or `*` for every one); with
    /// `write` false, the only mutations it may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<Vec<String>>,
}

pub use pagesync::mutators::MAX_SUBJECT_BYTES;

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("BUG: HMAC takes keys of any length")
}

/// Reads a secret file, refusing short secrets with a message that says what to do.
pub fn load_secret(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read the auth secret {}: {e}", path.display()))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        anyhow::bail!(
            "the auth secret in {} has {} bytes; use at least {MIN_SECRET_BYTES} (e.g. `head -c 48 /dev/urandom | base64 > {}`)",
            path.display(),
            secret.len(),
            path.display()
        );
    }
    Ok(secret)
}

pub fn mint(secret: &[u8], claims: &Claims) -> String {
    sign(secret, &serde_json::to_vec(claims).expect("BUG: claims serialize"))
}

/// A token of claims `body` (JSON), signed with `secret`.
fn sign(secret: &[u8], body: &[u8]) -> String {
    let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(body));
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(m.finalize().into_bytes()))
}

impl Claims {
    /// When the token expires, in ms since the Unix epoch.
    pub fn expires_ms(&self) -> i64 {
        self.exp.saturating_mul(1000)
    }
}

/// Checks a token's signature and expiry and turns its claims into a grant.
pub fn verify(secret: &[u8], token: &str, now_ms: i64) -> Result<Grant, String> {
    grant_of(&verify_claims(secret, token, now_ms)?)
}

/// Checks a token's signature and expiry; its claims.
pub fn verify_claims(secret: &[u8], token: &str, now_ms: i64) -> Result<Claims, String> {
    if token.is_empty() {
        return Err(
            "this server requires a token: the `pagesync` client's --token (or PAGESYNC_TOKEN), or `Authorization: Bearer TOKEN` on an HTTP request"
                .into(),
        );
    }
    let mut parts = token.split('.');
    let (Some(h), Some(b), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("malformed token: expected three dot-separated parts".into());
    };
    let header = B64.decode(h).map_err(|_| "malformed token header".to_owned())?;
    if header != HEADER.as_bytes() {
        return Err("unsupported token: only HS256 tokens from `pagesync-server token` are accepted".into());
    }
    let sig = B64.decode(sig).map_err(|_| "malformed token signature".to_owned())?;
    let mut m = mac(secret);
    m.update(format!("{h}.{b}").as_bytes());
    m.verify_slice(&sig).map_err(|_| "invalid token signature (minted with another secret?)".to_owned())?;
    let body = B64.decode(b).map_err(|_| "malformed token claims".to_owned())?;
    let claims: Claims = serde_json::from_slice(&body).map_err(|e| format!("malformed token claims: {e}"))?;
    if claims.expires_ms() <= now_ms {
        return Err(format!("the token expired at {} (unix seconds); mint a new one", claims.exp));
    }
    let NotBefore { nbf } =
        serde_json::from_slice(&body).map_err(|e| format!("malformed token claims: {e}"))?;
    if let Some(nbf) = nbf.filter(|nbf| nbf.saturating_mul(1000) > now_ms) {
        return Err(format!("the token is not valid before {nbf} (unix seconds)"));
    }
    Ok(claims)
}

/// A token's `nbf` claim (RFC 7519, 4.1.5): `pagesync-server token` never sets one, but a
/// token minted elsewhere may, and it is honoured.
#[derive(serde::Deserialize)]
struct NotBefore {
    #[serde(default)]
    nbf: Option<i64>,
}

/// The `doc` claim of a token that names no document (`token --metrics` alone): a name no
/// document id can have (ids are hex), so it opens none.
pub const NO_DOC: &str = "none";

/// Whether `doc` is a document claim a token can use: a document id, or a prefix of hex
/// digits followed by `*`.
pub fn check_doc_claim(doc: &str) -> Result<(), String> {
    match doc.strip_suffix('*') {
        Some(prefix) if prefix.chars().all(|c| c.is_ascii_hexdigit()) && prefix.len() <= 32 => Ok(()),
        Some(_) => Err("a prefix is at most 32 hex digits followed by `*`".into()),
        None => doc.parse::<pagesync::DocId>().map(|_| ()).map_err(|e| e.to_string()),
    }
}

/// The documents a token's claims grant.
pub fn grant_of(claims: &Claims) -> Result<Grant, String> {
    if claims.doc == NO_DOC {
        // Valid, for what else it allows (metrics); no document matches the prefix.
        let (write, admin, calls) = (false, false, None);
        return Ok(Grant {
            doc_prefix: Some(NO_DOC.into()),
            write,
            subject: Default::default(),
            admin,
            calls,
            expires_ms: Some(claims.expires_ms()),
        });
    }
    let doc_prefix = match claims.doc.strip_suffix('*') {
        Some(prefix) => prefix.to_ascii_lowercase(),
        None => claims
            .doc
            .parse::<pagesync::DocId>()
            .map_err(|e| format!("token names no valid document: {e}"))?
            .to_string(),
    };
    let subject = pagesync::mutators::cut_subject(claims.sub.clone().unwrap_or_default());
    check_subject(&subject)?;
    Ok(Grant {
        doc_prefix: Some(doc_prefix),
        write: claims.write,
        subject,
        admin: claims.admin,
        calls: claims.call.clone(),
        expires_ms: Some(claims.expires_ms()),
    })
}

/// A subject is written to the log and the history and bound by mutators as the caller: a
/// control character in it (a line break that forges a log line, a terminal escape) is
/// refused, in a token the server checks and in one it makes.
pub fn check_subject(subject: &str) -> Result<(), String> {
    match subject.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("the token's sub claim holds a control character ({c:?}): refused")),
        None => Ok(()),
    }
}

/// Parses a TTL such as `90s`, `30m`, `1h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<i64> {
    let expected = "expected a number and a unit: 90s, 30m, 1h or 7d";
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().map_err(|_| anyhow::anyhow!("{s:?}: {expected}"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        // A bare number is refused: 30 could mean any of them.
        "" => anyhow::bail!("{s:?} has no unit: {expected}"),
        _ => anyhow::bail!("{s:?}: unknown unit {unit:?}; {expected}"),
    };
    // In milliseconds too, which is how the server keeps it.
    n.checked_mul(scale)
        .filter(|secs| secs.checked_mul(1_000).is_some())
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify_and_grant_what_they_name() {
        let claims = Claims {
            doc: "ab*".into(),
            write: false,
            exp: 2_000_000_000,
            metrics: false,
            admin: false,
            sub: None,
            call: None,
        };
        let token = mint(SECRET, &claims);
        let grant = verify(SECRET, &token, 1_000).expect("valid");
        assert!(!grant.write);
        assert!(grant.allows("ab00000000000000000000000000000f".parse().expect("id")));
        assert!(!grant.allows("cd00000000000000000000000000000f".parse().expect("id")));
    }

    #[test]
    fn forged_expired_and_malformed_tokens_are_refused() {
        let claims = Claims {
            doc: "*".into(),
            write: true,
            exp: 10,
            metrics: false,
            admin: false,
            sub: Some("ann".into()),
            call: None,
        };
        let token = mint(SECRET, &claims);
        assert!(verify(SECRET, &token, 11_000).expect_err("expired").contains("expired"));
        assert!(
            verify(b"another secret, also 32 bytes long!", &token, 0)
                .expect_err("forged")
                .contains("signature")
        );
        assert!(verify(SECRET, "a.b", 0).is_err());
        assert!(verify(SECRET, "", 0).expect_err("empty").contains("requires a token"));
        // A `nbf` in the future (set by another minter) is honoured; one in the past is fine.
        let signed = |body: &str| sign(SECRET, body.as_bytes());
        let early = signed(r#"{"doc":"*","exp":4000000000,"nbf":3000000000}"#);
        assert!(verify(SECRET, &early, 2_000_000_000_000).expect_err("nbf").contains("not valid before"));
        assert!(verify(SECRET, &early, 3_000_000_000_000).is_ok());
        assert!(verify(SECRET, &signed(r#"{"doc":"*","exp":4000000000,"nbf":"x"}"#), 0).is_err());
        // A subject with a control character (a forged log line) is refused, however signed.
        let newline = signed(r#"{"doc":"*","exp":4000000000,"sub":"ann\nINFO forged"}"#);
        assert!(verify(SECRET, &newline, 0).expect_err("control").contains("control character"));
        assert!(verify(SECRET, &signed(r#"{"doc":"*","exp":4000000000,"sub":"Änn Øst"}"#), 0).is_ok());
        let mut tampered = token.clone();
        tampered.replace_range(40..41, if &token[40..41] == "A" { "B" } else { "A" });
        assert!(verify(SECRET, &tampered, 0).is_err());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h").expect("1h"), 3_600);
        assert_eq!(parse_ttl("90s").expect("90s"), 90);
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("30").expect_err("no unit").to_string().contains("no unit"));
        assert!(parse_ttl("9999999999999999d").is_err());
    }
}
