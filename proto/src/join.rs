//! The join string: the one value an admin hands to a cluster.
//!
//! `l2mesh1.` followed by the unpadded base64url encoding of a JSON object:
//!
//! ```json
//! {"brokers":["192.0.2.10:7443"],"ca":"sha256:<64 hex>","id":"<token id>",
//!  "secret":"<token secret>","cluster":"edge-1"}
//! ```
//!
//! - `brokers`: addresses (`host:port`) at which the broker's gRPC API listens.
//! - `ca`: pin of the broker CA: SHA-256 of the CA certificate in DER. The
//!   broker's TLS handshake sends `[server cert, CA cert]`; a joining agent
//!   trusts the server only if the CA it sends hashes to this pin and signs the
//!   server certificate (verified under TLS server name [`BROKER_SERVER_NAME`]).
//! - `id`, `secret`: the token. The broker stores only a hash of the secret.
//! - `cluster`: the only cluster name the token may join as.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Prefix (and format version) of every join string.
pub const JOIN_STRING_PREFIX: &str = "l2mesh1.";

/// TLS server name under which the broker's certificate is verified.
pub const BROKER_SERVER_NAME: &str = "l2mesh-broker";

/// Why a join string could not be read. The string itself never appears in
/// these messages (it carries a secret).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinStringError {
    #[error(
        "the join string does not start with `{JOIN_STRING_PREFIX}`: copy the whole string printed by `l2mesh-broker token create`"
    )]
    MissingPrefix,
    #[error(
        "the join string is not valid base64url after `{JOIN_STRING_PREFIX}`: it was probably truncated or altered while copying"
    )]
    NotBase64,
    #[error("the join string's content is malformed ({0}): create a new token")]
    Malformed(String),
    #[error("the join string has no {0}: create a new token")]
    Missing(&'static str),
    #[error("the join string's CA pin is not `sha256:` and 64 hex digits: create a new token")]
    BadPin,
}

/// A parsed join string. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinString {
    /// Broker gRPC addresses, `host:port`.
    pub brokers: Vec<String>,
    /// `sha256:<hex>` of the broker CA certificate (DER).
    pub ca: String,
    /// Token id.
    pub id: String,
    /// Token secret.
    pub secret: String,
    /// The cluster this token is for.
    pub cluster: String,
}

impl fmt::Debug for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinString")
            .field("brokers", &self.brokers)
            .field("ca", &self.ca)
            .field("id", &self.id)
            .field("secret", &crate::REDACTED)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl JoinString {
    /// Encode as `l2mesh1.<base64url(json)>`.
    #[must_use]
    pub fn encode(&self) -> String {
        // Serializing a struct of strings to JSON cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{JOIN_STRING_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parse and validate a join string (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<Self, JoinStringError> {
        let body = text
            .trim()
            .strip_prefix(JOIN_STRING_PREFIX)
            .ok_or(JoinStringError::MissingPrefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinStringError::NotBase64)?;
        let parsed: Self = serde_json::from_slice(&json)
            .map_err(|e| JoinStringError::Malformed(e.classify_name().to_owned()))?;
        if parsed.brokers.iter().all(|b| b.trim().is_empty()) {
            return Err(JoinStringError::Missing("broker address"));
        }
        for (value, what) in [
            (&parsed.id, "token id"),
            (&parsed.secret, "token secret"),
            (&parsed.cluster, "cluster name"),
        ] {
            if value.is_empty() {
                return Err(JoinStringError::Missing(what));
            }
        }
        parsed.ca_pin_sha256()?;
        Ok(parsed)
    }

    /// The CA pin as 32 raw bytes.
    pub fn ca_pin_sha256(&self) -> Result<[u8; 32], JoinStringError> {
        let hex = self
            .ca
            .strip_prefix("sha256:")
            .ok_or(JoinStringError::BadPin)?;
        if hex.len() != 64 {
            return Err(JoinStringError::BadPin);
        }
        let mut pin = [0u8; 32];
        for (i, byte) in pin.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| JoinStringError::BadPin)?;
        }
        Ok(pin)
    }

    /// Format a raw SHA-256 digest as a pin (`sha256:<hex>`).
    #[must_use]
    pub fn format_pin(digest: &[u8; 32]) -> String {
        use fmt::Write as _;
        let mut out = String::from("sha256:");
        for byte in digest {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or wrongly typed fields",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinString {
        JoinString {
            brokers: vec!["192.0.2.10:7443".into()],
            ca: JoinString::format_pin(&[0xab; 32]),
            id: "tok-1".into(),
            secret: "very-secret".into(),
            cluster: "edge-1".into(),
        }
    }

    #[test]
    fn round_trips() {
        let join = sample();
        let text = join.encode();
        assert!(text.starts_with(JOIN_STRING_PREFIX));
        assert_eq!(JoinString::parse(&format!("  {text}\n")).unwrap(), join);
        assert_eq!(join.ca_pin_sha256().unwrap(), [0xab; 32]);
    }

    #[test]
    fn debug_redacts_the_secret() {
        assert!(!format!("{:?}", sample()).contains("very-secret"));
    }

    #[test]
    fn bad_strings_get_specific_errors() {
        assert_eq!(
            JoinString::parse("hello"),
            Err(JoinStringError::MissingPrefix)
        );
        assert_eq!(
            JoinString::parse("l2mesh1.***"),
            Err(JoinStringError::NotBase64)
        );
        let text = sample().encode();
        assert!(matches!(
            JoinString::parse(&text[..text.len() - 10]),
            Err(JoinStringError::Malformed(_) | JoinStringError::NotBase64)
        ));
        let mut no_secret = sample();
        no_secret.secret.clear();
        assert_eq!(
            JoinString::parse(&no_secret.encode()),
            Err(JoinStringError::Missing("token secret"))
        );
        let mut bad_pin = sample();
        bad_pin.ca = "md5:00".into();
        assert_eq!(
            JoinString::parse(&bad_pin.encode()),
            Err(JoinStringError::BadPin)
        );
    }
}
